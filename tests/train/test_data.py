"""Training data: splits by subject, cases on the network grid, variants, crops, augmentation, caching."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from brainshift.errors import BrainshiftError, InputFileError
from brainshift.model import NetworkConfig
from brainshift.train.data import (
    TrainDataset,
    assemble_sample,
    crop_or_pad,
    crop_window,
    draw_variant,
    intensity_augmentation,
    prepare_case,
    read_keypoint_candidates,
    split_cases,
    validation_items,
)

NET = NetworkConfig(features=(4, 8))  # 1 mm grid, sizes multiple of 2


def test_split_by_subject(small_dataset):
    s = split_cases(small_dataset, (0.25, 0.25), seed=0)
    assert (len(s.subjects["train"]), len(s.subjects["val"]), len(s.subjects["test"])) == (2, 1, 1)
    subj = {k: {s.case_subject[c] for c in getattr(s, k)} for k in ("train", "val", "test")}
    assert not (subj["train"] & subj["val"]) and not (subj["train"] & subj["test"]) and not (subj["val"] & subj["test"])
    assert len(s.train) == 4 and len(s.val) == 2 and len(s.test) == 2  # both cases of each subject follow it
    assert split_cases(small_dataset, (0.25, 0.25), seed=0) == s
    others = [split_cases(small_dataset, (0.25, 0.25), seed=k).subjects["val"] for k in range(1, 6)]
    assert any(o != s.subjects["val"] for o in others)


def test_split_with_explicit_validation_subjects(small_dataset):
    s = split_cases(small_dataset, (0.25, 0.25), seed=0)
    subjects = sorted(s.subjects["train"] + s.subjects["val"] + s.subjects["test"])
    chosen = [subjects[0], subjects[3]]
    e = split_cases(small_dataset, (0.9, 0.25), seed=0, val_subjects=chosen)  # the val fraction is ignored
    assert e.subjects["val"] == chosen and len(e.val) == 4
    assert len(e.subjects["test"]) == 1 and len(e.subjects["train"]) == 1
    assert not set(e.subjects["test"]) & set(chosen)
    with pytest.raises(InputFileError, match="s9999"):
        split_cases(small_dataset, val_subjects=[subjects[0], "s9999"])
    with pytest.raises(InputFileError, match="at least one subject for training"):
        split_cases(small_dataset, val_subjects=subjects)


def test_split_keeps_a_training_subject(tiny_dataset, tmp_path):
    s = split_cases(tiny_dataset, (0.1, 0.15), seed=0)
    assert s.train == ["sub00_c0"] and s.val == [] and s.test == []
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputFileError, match="complete cases"):
        split_cases(tmp_path / "empty")
    with pytest.raises(InputFileError, match="missing, it does not exist"):
        split_cases(tmp_path / "missing")


def test_read_keypoint_candidates(tmp_path):
    assert read_keypoint_candidates(tmp_path) is None
    (tmp_path / "keypoints.csv").write_text("# frame: voxel\nx,y,z,scale_mm,response\n1,2,3,1.5,0.2\n4.5,5,6,2,0.1\n")
    np.testing.assert_array_equal(read_keypoint_candidates(tmp_path), [[1, 2, 3], [4.5, 5, 6]])
    (tmp_path / "keypoints.csv").write_text("a,b\n1,2\n")
    with pytest.raises(InputFileError, match="x, y, z"):
        read_keypoint_candidates(tmp_path)


def test_prepare_case_network_grid(tiny_dataset):
    from brainshift.simulate.dataset import read_case

    c = prepare_case(tiny_dataset, "sub00_c0", NET)
    gt = read_case(tiny_dataset, "sub00_c0").field
    # 1 mm input and 1 mm network: same grid, mm = voxel units, even sizes need no padding
    assert c["net_gt"].shape == (3, 16, 20, 16) and c["net_image"].shape == (1, 16, 20, 16)
    m = c["net_mask"][0] > 0
    np.testing.assert_allclose(c["net_gt"][:, m], gt[:, m], atol=1e-6)
    assert np.all(c["net_gt"][:, ~m] == 0)
    img = c["net_image"][0][m]
    assert abs(img.mean()) < 1e-4 and abs(img.std() - 1) < 1e-3  # z-scored over the brain
    assert not c["has_candidates"] and c["allowed"].sum() < c["brain"].sum()  # tumour/cavity excluded


def test_prepare_case_two_mm_network(tiny_dataset):
    c = prepare_case(tiny_dataset, "sub00_c0", NetworkConfig(features=(4, 8, 16), spacing_mm=2.0))
    assert c["net_gt"].shape == (3, 8, 12, 8)  # (8, 10, 8) padded to multiples of 4
    np.testing.assert_allclose(c["net_spacing"], [2, 2, 2])


def test_draw_variant_reproducible_and_consistent(tiny_dataset):
    c = prepare_case(tiny_dataset, "sub00_c0", NET)
    a = draw_variant(c, np.random.default_rng(3), NET, interp="linear", k_range=(6, 9), heldout_kpts=15,
                     keep_native=True)
    b = draw_variant(c, np.random.default_rng(3), NET, interp="linear", k_range=(6, 9), heldout_kpts=15)
    np.testing.assert_array_equal(a["points"], b["points"])
    np.testing.assert_array_equal(a["init_net"], b["init_net"])
    assert 6 <= len(a["points"]) <= 9 and a["method"] == "linear"
    assert len(a["points"]) + len(a["heldout_points"]) == 9 + 15
    chosen = {tuple(p) for p in a["points"]}
    assert not chosen & {tuple(p) for p in a["heldout_points"]}
    # keypoints lie in the allowed region and the linear initial field passes through them
    ijk = a["points"].astype(int)
    assert np.all(c["allowed"][ijk[:, 0], ijk[:, 1], ijk[:, 2]] > 0)
    np.testing.assert_allclose(a["init"][:, ijk[:, 0], ijk[:, 1], ijk[:, 2]].T, a["disps"], atol=1e-4)
    np.testing.assert_allclose(a["init_net"][:, ijk[:, 0], ijk[:, 1], ijk[:, 2]].T, a["disps"], atol=1e-4)
    methods = {draw_variant(c, np.random.default_rng(s), NET, interp=None, k_range=(6, 6))["method"]
               for s in range(8)}
    assert methods == {"linear", "tps"}  # the published "mixed"


def test_detected_keypoints_used_as_candidates(tiny_dataset):
    from brainshift.geometry import check_affine  # noqa: F401  (keeps the import surface honest)

    c = prepare_case(tiny_dataset, "sub00_c0", NET)
    vox = np.argwhere(c["allowed"] > 0)[::5][:30].astype(float)
    lines = "x,y,z\n" + "".join(f"{p[0]},{p[1]},{p[2]}\n" for p in vox)
    (tiny_dataset / "subjects" / "sub00" / "keypoints.csv").write_text(lines)
    c = prepare_case(tiny_dataset, "sub00_c0", NET)
    assert c["has_candidates"] and len(c["candidates"]) == 30
    v = draw_variant(c, np.random.default_rng(0), NET, interp="tps", k_range=(8, 8))
    cand = {tuple(p) for p in vox}
    assert all(tuple(p) in cand for p in v["points"]) and len(v["heldout_points"]) == 22


def test_crop_window_and_crop_or_pad():
    # window centre = start + (size - 1) / 2 as close as possible to the brain centre, kept inside the volume
    # along axes that are long enough (axis 1: centre 3 would start at -0.5 -> 0), padded where they are not
    np.testing.assert_array_equal(crop_window(np.array([10.0, 3.0, 5.0]), (20, 20, 8), (8, 8, 12)), [7, 0, 0])
    np.testing.assert_array_equal(crop_window(np.array([10.0, 18.0, 3.5]), (20, 20, 8), (8, 8, 12)), [7, 12, -2])
    a = np.arange(4 * 5 * 6, dtype=np.float32).reshape(1, 4, 5, 6)
    out = crop_or_pad(a, np.array([1, -1, 2]), (2, 3, 6), value=-7)
    assert out.shape == (1, 2, 3, 6)
    np.testing.assert_array_equal(out[0, :, 1:, :4], a[0, 1:3, 0:2, 2:6])
    assert np.all(out[0, :, 0] == -7) and np.all(out[0, :, :, 4:] == -7)


def test_assemble_sample_and_augmentation_touch_only_the_image(tiny_dataset):
    c = prepare_case(tiny_dataset, "sub00_c0", NET)
    v = draw_variant(c, np.random.default_rng(0), NET, interp="linear", k_range=(6, 6))
    plain = assemble_sample(c, v, (16, 18, 14))
    assert plain["input"].shape == (4, 16, 18, 14) and plain["target"].shape == (3, 16, 18, 14)
    assert plain["mask"].sum() == float(c["net_mask"].sum())  # the brain fits in the crop centred on it
    aug = [assemble_sample(c, v, (16, 18, 14), intensity_augmentation(), np.random.default_rng(s))
           for s in range(6)]
    for a in aug:
        assert torch.equal(a["input"][:3], plain["input"][:3]) and torch.equal(a["target"], plain["target"])
        assert torch.equal(a["image"], plain["image"])  # un-augmented copy kept for the image loss
    assert any(not torch.equal(a["input"][3], plain["input"][3]) for a in aug)
    again = assemble_sample(c, v, (16, 18, 14), intensity_augmentation(), np.random.default_rng(0))
    assert torch.equal(again["input"], aug[0]["input"])


def test_assemble_sample_flips_with_the_rng(tiny_dataset):
    c = prepare_case(tiny_dataset, "sub00_c0", NET)
    v = draw_variant(c, np.random.default_rng(0), NET, interp="linear", k_range=(6, 6))
    plain = assemble_sample(c, v, (16, 18, 14))
    flipped = [assemble_sample(c, v, (16, 18, 14), None, np.random.default_rng(s), (0,)) for s in range(8)]
    mirrored = [f for f in flipped if not torch.equal(f["target"], plain["target"])]
    assert 0 < len(mirrored) < 8  # probability 1/2 per sample
    f = mirrored[0]
    torch.testing.assert_close(f["target"][0], -plain["target"][0].flip(0))
    torch.testing.assert_close(f["target"][1:], plain["target"][1:].flip(1))
    torch.testing.assert_close(f["input"][:3], torch.cat([-plain["input"][:1], plain["input"][1:3]]).flip(1))
    torch.testing.assert_close(f["mask"], plain["mask"].flip(1))


def test_train_dataset_deterministic_and_epoch_dependent(small_dataset):
    s = split_cases(small_dataset, (0.0, 0.0))
    ds = TrainDataset(small_dataset, s.train, s.case_subject, NET, size=(16, 16, 16), interp=None, k_range=(6, 6),
                      heldout_kpts=5, augment=True, seed=1)
    assert len(ds) == 4  # one sample per subject
    x0 = ds[2]["input"]
    assert torch.equal(ds[2]["input"], x0)
    ds.set_epoch(1)
    assert not torch.equal(ds[2]["input"], x0)


def test_variant_pool_persistent_cache(tiny_dataset, tmp_path, monkeypatch):
    from brainshift.train import data as data_mod

    kw = dict(size=None, interp="linear", k_range=(6, 6), heldout_kpts=5, variants_per_case=2, seed=0,
              cache_dir=tmp_path / "cache")
    ds = TrainDataset(tiny_dataset, ["sub00_c0"], {"sub00_c0": "sub00"}, NET, samples_per_epoch=6, **kw)
    inputs = [ds[i]["input"] for i in range(6)]
    distinct = {x.numpy().tobytes() for x in inputs}
    assert len(distinct) <= 2  # drawn from the pool of 2 variants (no augmentation)
    # the cache holds the computed pool (network-grid arrays + 2 initial fields), not the input item
    files = list((tmp_path / "cache" / "variant_pools").glob("*.pt"))
    assert len(files) == 1
    cached = torch.load(files[0], weights_only=False)
    assert set(data_mod.SAMPLE_KEYS) <= set(cached) and "gt" not in cached and "image" not in cached
    assert tuple(np.asarray(cached["init_nets"]).shape) == (2, 3, *np.asarray(cached["net_gt"]).shape[1:])
    # a new dataset reads the pool back from disk: nothing is prepared or interpolated again
    monkeypatch.setattr(data_mod, "prepare_case", lambda *a, **k: pytest.fail("prepare_case called again"))
    ds2 = TrainDataset(tiny_dataset, ["sub00_c0"], {"sub00_c0": "sub00"}, NET, samples_per_epoch=6, **kw)
    assert all(torch.equal(ds2[i]["input"], inputs[i]) for i in range(6))


def test_in_memory_cache_prepares_each_case_once(tiny_dataset, monkeypatch):
    from brainshift.train import data as data_mod

    calls = []
    real = data_mod.prepare_case
    monkeypatch.setattr(data_mod, "prepare_case", lambda *a, **k: calls.append(a[1]) or real(*a, **k))
    ds = TrainDataset(tiny_dataset, ["sub00_c0"], {"sub00_c0": "sub00"}, NET, size=None, interp="tps",
                      k_range=(6, 6), heldout_kpts=5, variants_per_case=3, samples_per_epoch=5, seed=0)
    for i in range(5):
        ds[i]
    ds0 = TrainDataset(tiny_dataset, ["sub00_c0"], {"sub00_c0": "sub00"}, NET, size=None, interp="tps",
                       k_range=(6, 6), heldout_kpts=5, variants_per_case=0, samples_per_epoch=5, seed=0)
    for i in range(5):
        ds0[i]
    assert calls == ["sub00_c0", "sub00_c0"]  # once per dataset (when its cache is built), not per sample


def test_validation_items_fixed(tiny_dataset):
    a = validation_items(tiny_dataset, ["sub00_c0"], NET, seed=0, interp=None, k_range=(6, 6), heldout_kpts=10)
    b = validation_items(tiny_dataset, ["sub00_c0"], NET, seed=0, interp=None, k_range=(6, 6), heldout_kpts=10)
    np.testing.assert_array_equal(a[0][1]["init"], b[0][1]["init"])
    assert a[0][1]["init"].shape == (3, 16, 20, 16) and len(a[0][1]["heldout_points"]) == 10


def test_keypoint_rules_noise_and_methods(tiny_dataset):
    """Randomised keypoints (issue 11): each rule draws from its region, noise moves the driving displacements
    away from the ground truth by about its standard deviation, and the mixed choice covers every method."""
    from brainshift.train.data import CORTEX_DEPTH_MM, keypoint_candidates

    c = prepare_case(tiny_dataset, "sub00_c0", NET)
    depth = c["surface_depth_mm"]
    rng = np.random.default_rng(0)
    cort = keypoint_candidates(c, "cortex", rng, 40).astype(int)
    assert len(cort) > 0 and np.all(depth[tuple(cort.T)] <= CORTEX_DEPTH_MM)
    rand = keypoint_candidates(c, "random", rng, 40).astype(int)
    assert len(rand) == 40 and np.all(c["allowed"][tuple(rand.T)] > 0)
    exact = draw_variant(c, np.random.default_rng(5), NET, interp="linear", k_range=(8, 8), rules=("random",))
    noisy = draw_variant(c, np.random.default_rng(5), NET, interp="linear", k_range=(8, 8), rules=("random",),
                         noise_mm=(1.0, 1.0))
    np.testing.assert_array_equal(exact["points"], noisy["points"])
    d_mm = (noisy["disps"] - exact["disps"]) @ np.asarray(c["affine"])[:3, :3].T
    assert noisy["noise_mm"] == 1.0 and 0.4 < d_mm.std() < 1.8
    methods = {draw_variant(c, np.random.default_rng(s), NET, interp=None, k_range=(6, 6),
                            methods=("linear", "tps", "tps3d"))["method"] for s in range(20)}
    assert methods == {"linear", "tps", "tps3d"}
    with pytest.raises(BrainshiftError, match="keypoint rules"):
        draw_variant(c, rng, NET, interp="linear", k_range=(6, 6), rules=("everywhere",))


def test_default_variant_options_keep_earlier_draws(tiny_dataset):
    """The defaults draw no extra random numbers: a seed gives the same variant as before the options."""
    c = prepare_case(tiny_dataset, "sub00_c0", NET)
    a = draw_variant(c, np.random.default_rng(9), NET, interp=None, k_range=(6, 9))
    b = draw_variant(c, np.random.default_rng(9), NET, interp=None, k_range=(6, 9), rules=("detected",),
                     noise_mm=(0.0, 0.0), methods=("linear", "tps"))
    np.testing.assert_array_equal(a["points"], b["points"])
    np.testing.assert_array_equal(a["disps"], b["disps"])
    assert a["method"] == b["method"]


def test_variant_options_reach_the_pools_and_change_the_cache_key(tiny_dataset, tmp_path):
    """TrainDataset passes the keypoint policy to every variant, and pools made with another policy are not
    reused from the cache."""
    kw = dict(size=None, interp=None, k_range=(6, 6), heldout_kpts=5, variants_per_case=2, seed=0,
              cache_dir=tmp_path / "cache")
    opts = {"rules": ("random", "cortex"), "noise_mm": (0.0, 0.5), "methods": ("tps",)}
    ds = TrainDataset(tiny_dataset, ["sub00_c0"], {"sub00_c0": "sub00"}, NET, samples_per_epoch=2,
                      variant_options=opts, **kw)
    assert ds.cases[0]["methods"] == ["tps", "tps"]  # the only method the policy allows
    TrainDataset(tiny_dataset, ["sub00_c0"], {"sub00_c0": "sub00"}, NET, samples_per_epoch=2, **kw).cases[0]
    assert len(list((tmp_path / "cache" / "variant_pools").glob("*.pt"))) == 2


def test_craniotomy_entry_vox_maps_the_recorded_entry_point_and_is_nan_without_one():
    from brainshift.train.data import craniotomy_entry_vox

    affine = np.diag([2.0, 2.0, 3.0, 1.0])
    affine[:3, 3] = [-10.0, 4.0, 1.0]
    got = craniotomy_entry_vox({"params": {"entry_point_ras": [0.0, 10.0, 10.0]}}, affine)
    assert np.allclose(got, [5.0, 3.0, 3.0])
    assert np.isnan(craniotomy_entry_vox({"params": {}}, affine)).all()
    assert np.isnan(craniotomy_entry_vox(None, affine)).all()


# ------------------------------------------------------------------------------------ several dataset folders
def test_a_one_element_list_is_the_folder_itself(small_dataset, tiny_dataset, tmp_path):
    """Same keys, splits, validation draws, cache keys and cached items as the folder given as a string."""
    from brainshift.train.data import config_key

    for seed in range(3):
        assert split_cases([small_dataset], (0.25, 0.25), seed) == split_cases(str(small_dataset), (0.25, 0.25), seed)
    assert split_cases([str(small_dataset)], (0.25, 0.25), 0, ["sub01"]) == split_cases(small_dataset, (0.25, 0.25), 0,
                                                                                         ["sub01"])
    assert config_key([tiny_dataset], NET, {"x": 1}) == config_key(str(tiny_dataset), NET, {"x": 1})
    # a cache made with another network-grid preprocessing is never reused
    import brainshift.model.grid as grid_module

    key = config_key(tiny_dataset, NET, {"x": 1})
    version = grid_module.PREPROCESSING_VERSION
    try:
        grid_module.PREPROCESSING_VERSION = version + 1
        assert config_key(tiny_dataset, NET, {"x": 1}) != key
    finally:
        grid_module.PREPROCESSING_VERSION = version
    a, b = (validation_items(d, ["sub00_c0"], NET, seed=0, interp=None, k_range=(6, 6), heldout_kpts=10)
            for d in (tiny_dataset, [tiny_dataset]))
    assert a[0][0]["case_id"] == b[0][0]["case_id"] == "sub00_c0"
    np.testing.assert_array_equal(a[0][1]["init"], b[0][1]["init"])
    kw = dict(size=None, interp="linear", k_range=(6, 6), heldout_kpts=5, variants_per_case=2, seed=0,
              samples_per_epoch=3)
    one, listed = (TrainDataset(d, ["sub00_c0"], {"sub00_c0": "sub00"}, NET, cache_dir=tmp_path / name, **kw)
                   for d, name in ((tiny_dataset, "one"), ([tiny_dataset], "listed")))
    assert all(torch.equal(one[i]["input"], listed[i]["input"]) for i in range(3))
    names = [sorted(p.name for p in (tmp_path / n / "variant_pools").glob("*.pt")) for n in ("one", "listed")]
    assert len(names[0]) == 1 and names[0] == names[1]  # the item hash (the cache file name) is the same


def test_two_folders_with_colliding_case_ids_read_each_case_from_its_folder(two_datasets):
    from brainshift.train.data import case_key, case_source, cases_of

    a, b = two_datasets
    s = split_cases([a, b], (0.0, 0.0))
    assert s.train == ["0-sub00_c0", "0-sub01_c0", "0-sub02_c0", "0-sub03_c0", "1-sub00_c0", "1-sub01_c0"]
    assert s.val == s.test == [] and len(split_cases(a, (0.0, 0.0)).train) + len(split_cases(b, (0.0, 0.0)).train) == 6
    assert s.subjects["train"] == ["sub00", "sub01", "sub02", "sub03"] and s.case_subject["1-sub01_c0"] == "sub01"
    assert s.to_dict()["folders"] == [str(a), str(b)] and "folders" not in split_cases(a).to_dict()
    assert cases_of([a, b]) == (s.train, s.case_subject)
    assert case_key([a, b], 1, "sub00_c0") == "1-sub00_c0" and case_key([a], 1, "sub00_c0") == "sub00_c0"
    assert case_source([a, b], "1-sub00_c0") == (str(b), "sub00_c0") and case_source(a, "0-x") == (str(a), "0-x")
    alone = prepare_case(a, "sub00_c0", NET)
    first, second = (prepare_case([a, b], k, NET) for k in ("0-sub00_c0", "1-sub00_c0"))
    assert (first["case_id"], second["case_id"]) == ("0-sub00_c0", "1-sub00_c0")
    np.testing.assert_array_equal(first["gt"], alone["gt"])
    np.testing.assert_array_equal(second["gt"], 2 * alone["gt"])  # folder b's field: exactly twice a's
    assert np.abs(alone["gt"]).max() > 1.0
    for bad in ("sub00_c0", "2-sub00_c0", "x-sub00_c0", "1-"):
        with pytest.raises(BrainshiftError, match="folder index in 0..1"):
            case_source([a, b], bad)


def test_training_items_of_two_folders_are_distinct_cached_cases(two_datasets, tmp_path):
    a, b = two_datasets
    keys = ["0-sub00_c0", "0-sub01_c0", "1-sub00_c0"]
    subj = {k: k[2:7] for k in keys}
    ds = TrainDataset([a, b], keys, subj, NET, size=None, interp="linear", k_range=(6, 6), heldout_kpts=5,
                      variants_per_case=1, seed=0, cache_dir=tmp_path / "cache")
    assert len(ds) == 2 and ds.subjects == ["sub00", "sub01"]  # one sample per subject, over both folders
    assert ds.subject_cases["sub00"] == ["0-sub00_c0", "1-sub00_c0"]
    pools = [ds.cases[i] for i in range(3)]
    assert len(list((tmp_path / "cache" / "variant_pools").glob("*.pt"))) == 3  # one cached item per key
    assert [p["case_id"] for p in pools] == keys
    np.testing.assert_allclose(pools[2]["net_gt"], 2 * pools[0]["net_gt"], rtol=1e-6, atol=0)
    assert ds[0]["input"].shape == (4, 16, 20, 16)


def test_a_subject_in_two_folders_lands_in_one_split(two_datasets):
    a, b = two_datasets  # sub00, sub01 in both folders; sub02, sub03 only in a
    seen_val = set()
    for seed in range(6):
        s = split_cases([a, b], (0.25, 0.25), seed)
        assert sorted(sum(s.subjects.values(), [])) == ["sub00", "sub01", "sub02", "sub03"]
        where = {sub: {k for k in ("train", "val", "test") if sub in s.subjects[k]} for sub in s.subjects["train"]
                 + s.subjects["val"] + s.subjects["test"]}
        assert all(len(v) == 1 for v in where.values())
        for k in ("train", "val", "test"):  # every case follows its subject, from both folders
            assert getattr(s, k) == sorted(c for c, sub in s.case_subject.items() if sub in s.subjects[k])
        seen_val.update(s.subjects["val"])
    assert {"sub00", "sub01"} & seen_val  # a shared subject did go to validation (with both its cases)
    e = split_cases([a, b], (0.9, 0.0), 0, val_subjects=["sub01", "sub03"])
    assert e.val == ["0-sub01_c0", "0-sub03_c0", "1-sub01_c0"] and e.subjects["val"] == ["sub01", "sub03"]
    with pytest.raises(InputFileError, match="got s9999"):
        split_cases([a, b], val_subjects=["s9999"])


def test_several_folders_errors_are_one_line(two_datasets, tmp_path):
    a, b = two_datasets
    (tmp_path / "empty").mkdir()
    cases = [([], BrainshiftError, "at least one dataset folder, got an empty list"),
             ([a, tmp_path / "b" / ".." / "a"], BrainshiftError, f"{a} twice"),
             ([str(a), str(a)], BrainshiftError, "twice"),
             ([a, tmp_path / "missing"], InputFileError, f"folder at {tmp_path / 'missing'}, it does not exist"),
             ([a, tmp_path / "empty"], InputFileError, f"complete cases under {tmp_path / 'empty' / 'cases'}"),
             ([a, 3], BrainshiftError, "a dataset folder or a list of folders")]
    for data, err, match in cases:
        with pytest.raises(err) as info:
            split_cases(data)
        assert match in str(info.value) and "\n" not in str(info.value), (data, str(info.value))


def test_keypoint_channel_in_variants_samples_and_pools(tiny_dataset, tmp_path):
    from brainshift.geometry import voxel_to_ras
    from brainshift.model.grid import keypoint_proximity
    from brainshift.train.data import network_input_of

    kp_net = NetworkConfig(features=(4, 8), keypoint_channel="proximity", keypoint_scale_mm=4.0)
    c = prepare_case(tiny_dataset, "sub00_c0", kp_net)
    c_plain = prepare_case(tiny_dataset, "sub00_c0", NET)
    for k in ("net_image", "net_gt", "net_mask"):  # the case's grid arrays do not depend on the channel
        np.testing.assert_array_equal(c[k], c_plain[k])
    v = draw_variant(c, np.random.default_rng(3), kp_net, interp="linear", k_range=(6, 9), heldout_kpts=15)
    v_plain = draw_variant(c_plain, np.random.default_rng(3), NET, interp="linear", k_range=(6, 9), heldout_kpts=15)
    np.testing.assert_array_equal(v["points"], v_plain["points"])  # the same draws
    assert "proximity_net" not in v_plain
    ni = network_input_of(c, kp_net)
    expected = keypoint_proximity(voxel_to_ras(v["points"], c["affine"]), v["init_net"].shape[1:],
                                  ni.padded_affine, 4.0).numpy()
    np.testing.assert_allclose(v["proximity_net"], expected)
    ijk = v["points"].astype(int) + np.array([p[0] for p in ni.pad])  # 1 mm network grid: keypoints on voxels
    np.testing.assert_allclose(v["proximity_net"][ijk[:, 0], ijk[:, 1], ijk[:, 2]], 1.0, rtol=1e-6)
    # samples carry the channel last, cropped and mirrored with the image
    plain = assemble_sample(c, v, (16, 18, 14))
    assert plain["input"].shape == (5, 16, 18, 14)
    flipped = [assemble_sample(c, v, (16, 18, 14), None, np.random.default_rng(s), (0,)) for s in range(8)]
    f = next(f for f in flipped if not torch.equal(f["target"], plain["target"]))
    torch.testing.assert_close(f["input"][3:], plain["input"][3:].flip(1))
    # the variant pool keeps it (half precision) and the training samples use it
    ds = TrainDataset(tiny_dataset, ["sub00_c0"], {"sub00_c0": "sub00"}, kp_net, size=None, interp="linear",
                      k_range=(6, 6), variants_per_case=2, cache_dir=tmp_path / "cache")
    pool = ds.cases[0]
    assert np.asarray(pool["proximities"]).shape == (2, *v["init_net"].shape[1:])
    s = ds[0]
    assert s["input"].shape[0] == 5 and float(s["input"][4].max()) == pytest.approx(1.0, abs=1e-3)


def test_a_gp_variant_starts_from_the_gaussian_process_field(tiny_dataset):
    """``methods=("gp",)``: the variant's initial field is ``interpolate("gp", ...)`` of its own keypoints, on the
    network grid as every other initial field (zero outside the brain)."""
    from brainshift.interpolate import interpolate
    from brainshift.model.grid import field_to_network_grid
    from brainshift.train.data import network_input_of

    c = prepare_case(tiny_dataset, "sub00_c0", NET)
    v = draw_variant(c, np.random.default_rng(3), NET, interp=None, k_range=(8, 8), methods=("gp",))
    assert v["method"] == "gp"
    shape = tuple(int(s) for s in np.asarray(c["image"]).shape)
    gp = interpolate("gp", v["points"], v["disps"], shape, np.asarray(c["affine"]))
    want = field_to_network_grid(gp, network_input_of(c, NET), zero_outside=True)[0].numpy()
    np.testing.assert_allclose(v["init_net"], want, atol=1e-5)
    assert np.abs(want).max() > 0
