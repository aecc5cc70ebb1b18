"""simulate-batch writes each case's synthetic intraop MRI (intraop_t1.nii.gz) seeded from the case seed."""

from __future__ import annotations

import nibabel as nib
import numpy as np

from brainshift.simulate.batch import case_seed, simulate_batch
from brainshift.simulate.dataset import INTRAOP_FILE, intraop_seed, read_case

from ._subject_files import write_phantom_files
from .test_batch import FAST, _fake_simulate_case


def test_intraop_seed_is_derived_stable_and_distinct():
    s = intraop_seed(12345)
    assert s == intraop_seed(12345) and s != intraop_seed(12346) and s != 12345
    # pinned: numpy.random.SeedSequence([12345, 1]).generate_state(1)[0]
    assert s == int(np.random.SeedSequence([12345, 1]).generate_state(1)[0])


def test_batch_case_has_its_intraop_image_and_parameters(tmp_path, monkeypatch):
    from brainshift.simulate import case as case_mod

    monkeypatch.setattr(case_mod, "simulate_case", _fake_simulate_case())  # 0.5 voxel shift along i in the brain
    spec = write_phantom_files(tmp_path / "in", "a")
    out = tmp_path / "ds"
    rep = simulate_batch(out, subjects=[spec], cases_per_subject=1, config=FAST, seed=7, n_workers=1,
                         processes=False, progress=False)
    assert rep.ok, rep.failed
    case = read_case(out, "s0000_c00")
    meta = case.meta["intraop"]
    assert meta["file"] == INTRAOP_FILE and meta["seed"] == intraop_seed(case_seed(7, 0, 0))
    img = nib.load(out / "cases" / "s0000_c00" / INTRAOP_FILE)
    # the image lies on the drawn grid (another spacing / orientation than the preop), as recorded
    assert list(img.shape) == meta["shape"]
    np.testing.assert_allclose(img.affine, np.asarray(meta["affine"]), atol=1e-4)
    assert 1.0 <= meta["spacing_mm"] <= 1.5 and np.asarray(img.dataobj).std() > 0
