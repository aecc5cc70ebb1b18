"""Batch generation: layout, seeds, resume, failures (Dask LocalCluster with threads for speed)."""

from __future__ import annotations

import dataclasses
import json
import types

import numpy as np
import pytest

from brainshift.errors import BrainshiftError, InputFileError
from brainshift.simulate import batch as batch_mod
from brainshift.simulate.batch import case_seed, read_subjects_csv, simulate_batch, subject_seed
from brainshift.simulate.case import SimulationConfig
from brainshift.simulate.dataset import list_cases, read_case, read_subject

from ._subject_files import phantom_subject, write_phantom_files

FAST = SimulationConfig(resolution_mm=6.0)


def test_seeds_deterministic_and_distinct():
    assert subject_seed(7, 3) == subject_seed(7, 3)
    assert case_seed(7, 3, 1) == case_seed(7, 3, 1)
    seeds = {subject_seed(7, i) for i in range(20)} | {case_seed(7, i, j) for i in range(5) for j in range(4)}
    assert len(seeds) == 40  # no collisions between subjects, cases and indices
    assert subject_seed(7, 0) != subject_seed(8, 0)


def test_batch_real_solver_layout_resume_and_failed_subject(tmp_path):
    specs = [write_phantom_files(tmp_path / "in", "a"),
             write_phantom_files(tmp_path / "in", "b", tumour_offset_mm=(-10.0, 8.0, 6.0)),
             write_phantom_files(tmp_path / "in", "broken", empty_tumour=True)]
    out = tmp_path / "ds"
    rep = simulate_batch(out, subjects=specs, cases_per_subject=2, config=FAST, seed=3, n_workers=2,
                         processes=False, progress=False)
    good = ["s0000_c00", "s0000_c01", "s0001_c00", "s0001_c01"]
    assert rep.simulated == good and rep.skipped == []
    assert sorted(rep.failed) == ["s0002_c00", "s0002_c01"]
    assert "non-empty tumour" in rep.failed["s0002_c00"]
    assert list_cases(out) == good
    log = (out / "failures.log").read_text()
    assert "s0002_c00" in log and "s0002_c01" in log and "Traceback" in log and "GeometryError" in log
    # layout: subjects and cases readable by the dataset contract
    subj = read_subject(out, "s0001")
    assert subj.info["source"] == "file" and subj.tumour_mask.data.sum() > 0
    case = read_case(out, "s0001_c01")
    assert case.field.shape == (3, *subj.image.shape) and case.field.dtype == np.float32
    assert case.meta["subject"] == "s0001" and case.meta["case_seed"] == case_seed(3, 1, 1)
    assert case.meta["params"]["seed"] == case_seed(3, 1, 1)
    assert case.meta["max_displacement_mm"] > 0
    assert np.all(case.field[:, subj.brain_mask.data == 0] == 0)
    ds = json.loads((out / "dataset.json").read_text())
    assert ds["seed"] == 3 and ds["cases_per_subject"] == 2 and ds["simulation_config"]["resolution_mm"] == 6.0
    assert ds["counts"]["cases_complete"] == 4 and ds["counts"]["cases_failed_last_run"] == 2
    mtime = (out / "cases" / "s0000_c00" / "meta.json").stat().st_mtime_ns

    # resume: complete cases skipped, nothing simulated again, the broken subject still reported
    rep2 = simulate_batch(out, subjects=specs, cases_per_subject=2, config=FAST, seed=3, n_workers=2,
                          processes=False, progress=False)
    assert rep2.simulated == [] and rep2.skipped == good and sorted(rep2.failed) == ["s0002_c00", "s0002_c01"]
    assert (out / "cases" / "s0000_c00" / "meta.json").stat().st_mtime_ns == mtime


def _fake_simulate_case(fail_seed=None):
    def fake(subject, config, params, *, progress=False):
        if fail_seed is not None and params.seed == fail_seed:
            raise RuntimeError("deliberate failure")
        field = np.zeros((3, *subject.image.shape), np.float32)
        field[0][subject.brain_mask.data > 0] = 0.5
        return types.SimpleNamespace(field_vox=field, cavity_mask=subject.tumour_mask,
                                     meta={"max_displacement_mm": 1.0, "params": params.to_dict()})
    return fake


def test_failed_case_logged_others_complete_and_resume_extends(tmp_path, monkeypatch):
    from brainshift.simulate import case as case_mod

    monkeypatch.setattr(case_mod, "simulate_case", _fake_simulate_case(fail_seed=case_seed(5, 0, 1)))
    spec = write_phantom_files(tmp_path / "in", "a")
    out = tmp_path / "ds"
    rep = simulate_batch(out, subjects=[spec], cases_per_subject=3, config=FAST, seed=5, n_workers=2,
                         processes=False, progress=False)
    assert rep.simulated == ["s0000_c00", "s0000_c02"] and list(rep.failed) == ["s0000_c01"]
    assert "RuntimeError: deliberate failure" in rep.failed["s0000_c01"]
    assert "deliberate failure" in (out / "failures.log").read_text()
    assert not (out / "cases" / "s0000_c01" / "meta.json").exists()
    assert "1 failed" in rep.summary() and not rep.ok
    # a resumed run with more cases per subject extends the dataset; the failed case is retried
    monkeypatch.setattr(case_mod, "simulate_case", _fake_simulate_case())
    rep2 = simulate_batch(out, subjects=[spec], cases_per_subject=4, config=FAST, seed=5, n_workers=1,
                          processes=False, progress=False)
    assert rep2.simulated == ["s0000_c01", "s0000_c03"] and rep2.skipped == ["s0000_c00", "s0000_c02"]
    assert rep2.ok and json.loads((out / "dataset.json").read_text())["cases_per_subject"] == 4


def test_synthetic_subjects_use_derived_seeds(tmp_path, monkeypatch):
    from brainshift.simulate import case as case_mod
    from brainshift.simulate import subject as subject_mod

    calls = []

    def fake_synth(seed, *, config=None, subject_id=None):
        calls.append(seed)
        s = phantom_subject(subject_id)
        s.info = {"source": "synthetic-mni152", "seed": seed}
        return s

    monkeypatch.setattr(subject_mod, "synthesize_subject", fake_synth)
    monkeypatch.setattr(case_mod, "simulate_case", _fake_simulate_case())
    out = tmp_path / "ds"
    rep = simulate_batch(out, subjects=2, cases_per_subject=1, config=FAST, seed=11, n_workers=2,
                         processes=False, progress=False)
    assert rep.simulated == ["s0000_c00", "s0001_c00"]
    assert sorted(calls) == sorted([subject_seed(11, 0), subject_seed(11, 1)])
    assert read_subject(out, "s0001").info["seed"] == subject_seed(11, 1)
    ds = json.loads((out / "dataset.json").read_text())
    assert [s["seed"] for s in ds["subjects"]] == [subject_seed(11, 0), subject_seed(11, 1)]
    assert ds["synthesis_config"]["tumour_radius_range_mm"] == [8.0, 25.0]
    # resuming with another seed or config is refused, not mixed into the dataset
    with pytest.raises(BrainshiftError, match="same seed"):
        simulate_batch(out, subjects=2, cases_per_subject=1, config=FAST, seed=12, processes=False, progress=False)
    with pytest.raises(BrainshiftError, match="same simulation_config"):
        simulate_batch(out, subjects=2, cases_per_subject=1, config=SimulationConfig(resolution_mm=5.0), seed=11,
                       processes=False, progress=False)
    # a dataset written by a version without a field that now exists resumes when the field keeps its default
    # (the old behaviour), and is refused when the request sets it to something else
    ds = json.loads((out / "dataset.json").read_text())
    del ds["simulation_config"]["contact_settle_fraction"]
    (out / "dataset.json").write_text(json.dumps(ds))
    rep = simulate_batch(out, subjects=2, cases_per_subject=1, config=FAST, seed=11, processes=False, progress=False)
    assert rep.ok and rep.skipped == ["s0000_c00", "s0001_c00"]
    assert json.loads((out / "dataset.json").read_text())["simulation_config"]["contact_settle_fraction"] == 0.0
    (out / "dataset.json").write_text(json.dumps(ds))  # the old record again
    with pytest.raises(BrainshiftError, match="same simulation_config"):
        simulate_batch(out, subjects=2, cases_per_subject=1, seed=11, processes=False, progress=False,
                       config=dataclasses.replace(FAST, contact_settle_fraction=0.01))


def test_a_batch_made_in_parts_equals_the_whole(tmp_path, monkeypatch):
    # --subjects START:STOP: the same subject ids, subject seeds and case seeds as that part of a batch of STOP,
    # so parts made on different days or machines add up to the documented batch
    from brainshift.simulate import case as case_mod
    from brainshift.simulate import subject as subject_mod

    def fake_synth(seed, *, config=None, subject_id=None):
        s = phantom_subject(subject_id)
        s.info = {"source": "synthetic-mni152", "seed": seed}
        return s

    monkeypatch.setattr(subject_mod, "synthesize_subject", fake_synth)
    monkeypatch.setattr(case_mod, "simulate_case", _fake_simulate_case())
    assert batch_mod.normalise_subjects(range(1, 3), 7) == batch_mod.normalise_subjects(3, 7)[1:]
    whole, parts = tmp_path / "whole", tmp_path / "parts"
    simulate_batch(whole, subjects=3, cases_per_subject=2, config=FAST, seed=7, processes=False, progress=False)
    rep = simulate_batch(parts, subjects=range(2, 3), cases_per_subject=2, config=FAST, seed=7, processes=False,
                         progress=False)
    assert rep.simulated == ["s0002_c00", "s0002_c01"]
    simulate_batch(parts, subjects=range(0, 2), cases_per_subject=2, config=FAST, seed=7, processes=False,
                   progress=False)
    a, b = (json.loads((d / "dataset.json").read_text()) for d in (whole, parts))
    assert sorted(a["subjects"], key=lambda e: e["index"]) == sorted(b["subjects"], key=lambda e: e["index"])
    for cid in ("s0000_c01", "s0002_c00"):
        ma, mb = (json.loads((d / "cases" / cid / "meta.json").read_text()) for d in (whole, parts))
        assert ma["case_seed"] == mb["case_seed"] == case_seed(7, int(cid[1:5]), int(cid[-2:]))
    for bad in (range(3, 3), range(0, 4, 2)):
        with pytest.raises(BrainshiftError, match="range of synthetic subjects"):
            batch_mod.normalise_subjects(bad, 0)


def test_read_subjects_csv(tmp_path):
    (tmp_path / "sub").mkdir()
    csv = tmp_path / "sub" / "subjects.csv"
    csv.write_text("image,brain_mask,tumour,ventricles,tumour_labels,subject_id\n"
                   "a/t1.nii.gz,a/brain.nii.gz,a/seg.nii.gz,,1 4,upenn001\n"
                   "/abs/t1.nii.gz,/abs/brain.nii.gz,/abs/seg.nii.gz,/abs/v.nii.gz,,\n")
    specs = read_subjects_csv(csv)
    assert specs[0] == {"image": str(tmp_path / "sub" / "a/t1.nii.gz"), "brain_mask": str(tmp_path / "sub" /
                        "a/brain.nii.gz"), "tumour": str(tmp_path / "sub" / "a/seg.nii.gz"), "tumour_labels": [1, 4],
                        "subject_id": "upenn001"}
    assert specs[1] == {"image": "/abs/t1.nii.gz", "brain_mask": "/abs/brain.nii.gz", "tumour": "/abs/seg.nii.gz",
                        "ventricles": "/abs/v.nii.gz"}
    bad = tmp_path / "bad.csv"
    bad.write_text("image,brain\nx,y\n")
    with pytest.raises(InputFileError, match="columns"):
        read_subjects_csv(bad)
    with pytest.raises(InputFileError, match="not found"):
        read_subjects_csv(tmp_path / "none.csv")


def test_bad_requests_raise(tmp_path):
    with pytest.raises(BrainshiftError, match="cases_per_subject"):
        simulate_batch(tmp_path, subjects=1, cases_per_subject=0, config=FAST, seed=0, progress=False)
    for n in (0, -2):  # 0 silently meant one worker per core
        with pytest.raises(BrainshiftError, match=f"expected at least 1 worker, got {n}"):
            simulate_batch(tmp_path / "w", subjects=1, cases_per_subject=1, config=FAST, seed=0, n_workers=n,
                           progress=False)
    assert not (tmp_path / "w").exists()
    with pytest.raises(BrainshiftError, match="spec keys"):
        simulate_batch(tmp_path, subjects=[{"image": "x"}], cases_per_subject=1, config=FAST, seed=0, progress=False)
    with pytest.raises(BrainshiftError, match="unique"):
        batch_mod.normalise_subjects([{"image": "a", "brain_mask": "b", "tumour": "c", "subject_id": "x"}] * 2, 0)


def test_subject_keypoints_written_and_added_on_resume(tmp_path, monkeypatch):
    from brainshift.keypoints.detect import detect_keypoints
    from brainshift.simulate import case as case_mod
    from brainshift.simulate.dataset import read_subject_keypoints

    monkeypatch.setattr(case_mod, "simulate_case", _fake_simulate_case())
    spec = write_phantom_files(tmp_path / "in", "a")
    out = tmp_path / "ds"
    rep = simulate_batch(out, subjects=[spec], cases_per_subject=1, config=FAST, seed=5, n_workers=1,
                         processes=False, progress=False)
    assert rep.ok
    kp_file = out / "subjects" / "s0000" / "keypoints.csv"
    cands = read_subject_keypoints(out, "s0000")
    subj = read_subject(out, "s0000")
    allowed = (subj.brain_mask.data > 0) & (subj.tumour_mask.data == 0)
    expected = detect_keypoints(subj.image, allowed).points_vox
    assert cands is not None and cands.shape == expected.shape
    np.testing.assert_allclose(cands, expected, atol=1e-4)  # written with 4 decimals
    if len(cands):
        assert allowed[tuple(np.round(cands).astype(int).T)].all()
    # a resumed run with every case done adds a missing keypoints file and simulates nothing
    kp_file.unlink()
    mtime = (out / "cases" / "s0000_c00" / "meta.json").stat().st_mtime_ns
    rep2 = simulate_batch(out, subjects=[spec], cases_per_subject=1, config=FAST, seed=5, n_workers=1,
                          processes=False, progress=False)
    assert rep2.ok and rep2.simulated == [] and kp_file.is_file()
    assert (out / "cases" / "s0000_c00" / "meta.json").stat().st_mtime_ns == mtime
    # and without keypoints none is written
    kp_file.unlink()
    simulate_batch(out, subjects=[spec], cases_per_subject=1, config=FAST, seed=5, n_workers=1,
                   processes=False, progress=False, keypoints=False)
    assert not kp_file.exists()


def test_local_workers_keep_glibc_dynamic_mmap_threshold(monkeypatch):
    """distributed's nanny exports MALLOC_TRIM_THRESHOLD_ to its workers (25-30 % slower simulations here);
    the LocalCluster of simulate_batch is started without it (LOCAL_WORKER_CONFIG)."""
    import os

    import dask
    from distributed import Client, LocalCluster

    monkeypatch.delenv("MALLOC_TRIM_THRESHOLD_", raising=False)  # restored (removed) after the test

    def worker_env():
        return os.environ.get("MALLOC_TRIM_THRESHOLD_")

    with dask.config.set(batch_mod.LOCAL_WORKER_CONFIG):
        with LocalCluster(n_workers=1, threads_per_worker=1, processes=True, dashboard_address=None) as cluster, \
                Client(cluster) as client:
            assert list(client.run(worker_env).values()) == [None]
    default = dask.config.get("distributed.nanny.pre-spawn-environ.MALLOC_TRIM_THRESHOLD_", None)
    if default is not None:  # distributed's default (65536 in 2026.8), for contrast
        with LocalCluster(n_workers=1, threads_per_worker=1, processes=True, dashboard_address=None) as cluster, \
                Client(cluster) as client:
            assert list(client.run(worker_env).values()) == [str(default)]


def test_no_intraop_skips_the_synthetic_intraop_image(tmp_path, monkeypatch):
    from brainshift.simulate import case as case_mod
    from brainshift.simulate.dataset import INTRAOP_FILE

    monkeypatch.setattr(case_mod, "simulate_case", _fake_simulate_case())
    spec = write_phantom_files(tmp_path / "in", "a")
    for flag, expected in ((False, False), (True, True)):
        out = tmp_path / f"ds_{flag}"
        rep = simulate_batch(out, subjects=[spec], cases_per_subject=1, config=FAST, seed=5, n_workers=1,
                             processes=False, progress=False, keypoints=False, intraop=flag)
        assert rep.ok
        assert (out / "cases" / "s0000_c00" / INTRAOP_FILE).is_file() is expected
