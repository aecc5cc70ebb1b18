"""The MNI152 template shipped inside nilearn: the built-in brain of the demo and of synthetic subjects.

Loaded by nilearn's own loader from the files nilearn installs (nothing is downloaded).
"""

from __future__ import annotations

import numpy as np

from brainshift.volume import Volume


def load_mni152() -> tuple[Volume, Volume]:
    """The MNI152 T1 template (1 mm, 197 x 233 x 189, skull-stripped) and its brain mask, from nilearn's files.

    Returns:
        ``(t1, brain_mask)`` as :class:`Volume` (intensity float32 in [0, 1]; label uint8).
    """
    from nilearn.datasets import load_mni152_brain_mask, load_mni152_template

    t1 = load_mni152_template(resolution=1)
    mask = load_mni152_brain_mask(resolution=1)
    return (Volume(np.asarray(t1.get_fdata(), dtype=np.float32), t1.affine, "intensity"),
            Volume((np.asarray(mask.get_fdata()) > 0).astype(np.uint8), mask.affine, "label"))
