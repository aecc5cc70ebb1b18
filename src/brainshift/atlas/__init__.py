"""Per-patient deformation atlas: simulated solutions of one brain (:mod:`brainshift.atlas.basis`) fitted to
sparse keypoints (:mod:`brainshift.atlas.fit`). Built by :func:`brainshift.simulate.atlas.build_atlas`
(``brainshift atlas``); used by ``brainshift infer -m atlas`` and :func:`brainshift.compensate`."""

from brainshift.atlas.basis import DeformationAtlas, load_atlas, save_atlas
from brainshift.atlas.fit import AtlasFit, fit_atlas

__all__ = ["AtlasFit", "DeformationAtlas", "fit_atlas", "load_atlas", "save_atlas"]
