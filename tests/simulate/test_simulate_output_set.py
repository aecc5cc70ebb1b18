"""`brainshift simulate` writes its dataset folder all or nothing (:class:`brainshift.io.output_set.OutputSet`).

A failure at any write (a full disk, simulated by a writer raising ``ENOSPC``) or at any rename leaves ``--out``
byte-for-byte as it was, with one ``error:`` line naming the file and the cause, exit 2; a second run replaces
only the files the first one listed in its ``summary.json``, and a user's file at an output name is refused
before the simulation runs. The subject and the solver are faked (a phantom, a constant field), as in
``test_commands.py``; the files are the real writers'.
"""

from __future__ import annotations

import errno
import json
import os
import types
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from brainshift.cli import app
from brainshift.io.output_set import STAGING_PREFIX, OutputSet
from brainshift.simulate import case as case_mod
from brainshift.simulate import dataset as dataset_mod
from brainshift.simulate import subject as subject_mod
from brainshift.simulate.dataset import list_cases, read_case

from ._subject_files import phantom_subject

runner = CliRunner()

CASE = "cases/s0000_c00"
#: what `simulate --demo` writes, in the order it is written and moved into place (each folder's marker last)
WRITES = ["subjects/s0000/t1.nii.gz", "subjects/s0000/brain_mask.nii.gz", "subjects/s0000/tumour_mask.nii.gz",
          "subjects/s0000/ventricles_mask.nii.gz", "subjects/s0000/subject.json",
          f"{CASE}/displacement_magnitude.png", f"{CASE}/field.npz", f"{CASE}/cavity_mask.nii.gz",
          f"{CASE}/intraop_t1.nii.gz", f"{CASE}/meta.json", "dataset.json", "summary.json"]
NO_SPACE = os.strerror(errno.ENOSPC)


def _snapshot(folder: Path) -> dict[str, bytes | None]:
    if not folder.exists():
        return {}
    return {p.relative_to(folder).as_posix(): (None if p.is_dir() else p.read_bytes())
            for p in sorted(folder.rglob("*"))}


@pytest.fixture
def fake_solver(monkeypatch):
    """A phantom subject for --demo and a constant 1-voxel field for the solver; counts the simulations."""
    calls = {"simulate": 0}

    def synth(seed, *, config=None, subject_id=None):
        s = phantom_subject(subject_id)
        s.info = {"source": "synthetic-mni152", "seed": seed}
        return s

    def simulate(subject, config, params, *, progress=False):
        calls["simulate"] += 1
        field = np.zeros((3, *subject.image.shape), np.float32)
        field[2][subject.brain_mask.data > 0] = 1.0
        return types.SimpleNamespace(field_vox=field, cavity_mask=subject.tumour_mask,
                                     meta={"max_displacement_mm": 2.0, "median_displacement_mm": 2.0,
                                           "params": params.to_dict(), "config": config.to_dict()})

    monkeypatch.setattr(subject_mod, "synthesize_subject", synth)
    monkeypatch.setattr(case_mod, "simulate_case", simulate)
    return calls


def _simulate(out: Path, seed: int = 0):
    return runner.invoke(app, ["simulate", "--demo", "--out", str(out), "--seed", str(seed), "--resolution", "6"])


def _error_line(res) -> str:
    assert res.exit_code == 2, res.output
    assert "Traceback" not in res.output, res.output
    lines = [ln for ln in res.stderr.splitlines() if ln.strip() and not ln.startswith("warning:")]
    assert len(lines) == 1 and lines[0].startswith("error: "), res.stderr
    return lines[0]


@pytest.fixture
def earlier(tmp_path, fake_solver):
    """An output folder holding an earlier run's dataset (seed 1) and a user's files beside it."""
    out = tmp_path / "out"
    assert _simulate(out, seed=1).exit_code == 0
    (out / "notes.txt").write_text("the user's")
    (out / "cases" / "README").write_text("also the user's")
    return out


def test_simulate_writes_its_tree_with_a_manifest_markers_last(tmp_path, fake_solver):
    out = tmp_path / "new" / "out"
    res = _simulate(out)
    assert res.exit_code == 0, res.output
    assert json.loads((out / "summary.json").read_text())["outputs"] == WRITES
    assert sorted(k for k, v in _snapshot(out).items() if v is not None) == sorted(WRITES)  # nothing else
    assert list_cases(out) == ["s0000_c00"] and read_case(out, "s0000_c00").meta["batch_seed"] == 0
    assert json.loads((out / "dataset.json").read_text())["counts"]["cases_complete"] == 1
    assert f"wrote {out / CASE}" in res.stdout


def _faulty_write(monkeypatch, fail_at: int, exc: BaseException) -> list[str]:
    """Make the ``fail_at``-th output write leave a partial file and raise ``exc``; return the names written."""
    calls: list[str] = []
    original = OutputSet.write

    def write(self, name, writer):
        calls.append(name)
        if len(calls) - 1 == fail_at:
            def broken(path):
                path.write_bytes(b"partial")
                raise exc
            return original(self, name, broken)
        return original(self, name, writer)

    monkeypatch.setattr(OutputSet, "write", write)
    return calls


@pytest.mark.parametrize("step", range(len(WRITES)))
def test_full_disk_at_each_write_leaves_the_folder_as_it_was(earlier, monkeypatch, step):
    before = _snapshot(earlier)
    calls = _faulty_write(monkeypatch, step, OSError(errno.ENOSPC, NO_SPACE))
    line = _error_line(_simulate(earlier, seed=2))
    assert calls == WRITES[: step + 1]
    assert f"{earlier / WRITES[step]}" in line and NO_SPACE in line, line
    assert _snapshot(earlier) == before


def test_full_disk_in_a_real_writer_leaves_a_new_folder_absent(tmp_path, fake_solver, monkeypatch):
    """The NIfTI writer itself fails (as on a full disk): the folder the run would have created is not left."""
    def no_space(vol, path):
        raise OSError(errno.ENOSPC, NO_SPACE)

    monkeypatch.setattr(dataset_mod, "_write_nifti", no_space)
    out = tmp_path / "new" / "out"
    line = _error_line(_simulate(out))
    assert line == (f"error: expected to write {out / WRITES[0]}, got: {NO_SPACE}; nothing in {out} was changed")
    assert not (tmp_path / "new").exists()


def test_full_disk_at_a_rename_leaves_the_folder_as_it_was(earlier, monkeypatch):
    """os.replace fails at the writers' first and last atomic rename in the staging folder, and at the commit's
    first and last setting aside of the earlier set and moving in of the new one (meta.json, summary.json).
    Every rename of a nested commit is failed in turn, cheaply, in tests/io/test_output_set_tree.py."""
    import shutil

    real_replace = os.replace
    renames: list[tuple[Path, Path]] = []
    fail = {"at": -1}

    def replace(src, dst):
        renames.append((Path(src), Path(dst)))
        if len(renames) - 1 == fail["at"]:
            raise OSError(errno.ENOSPC, NO_SPACE, str(dst))
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    probe = earlier.parent / "probe"  # a run into a copy of the folder lists the renames
    shutil.copytree(earlier, probe)
    assert _simulate(probe, seed=2).exit_code == 0
    staged = [i for i, (_, dst) in enumerate(renames) if STAGING_PREFIX in str(dst) and ".replaced" not in str(dst)]
    aside = [i for i, (_, dst) in enumerate(renames) if ".replaced" in str(dst)]
    moved_in = [i for i, (_, dst) in enumerate(renames) if STAGING_PREFIX not in str(dst)]
    assert len(aside) == len(moved_in) == len(WRITES) and staged[-1] < aside[0] < aside[-1] < moved_in[0]
    meta = next(i for i in moved_in if renames[i][1] == probe / CASE / "meta.json")
    before = _snapshot(earlier)
    for step in sorted({staged[0], staged[-1], aside[0], aside[-1], moved_in[0], meta, moved_in[-1]}):
        renames.clear()
        fail["at"] = step
        line = _error_line(_simulate(earlier, seed=2))
        assert NO_SPACE in line, (step, line)
        assert _snapshot(earlier) == before, f"a failed rename {step} changed the folder"


def test_a_second_run_replaces_only_what_the_first_wrote(earlier):
    first = _snapshot(earlier)
    res = _simulate(earlier, seed=2)
    assert res.exit_code == 0, res.output
    after = _snapshot(earlier)
    assert after["notes.txt"] == b"the user's" and after["cases/README"] == b"also the user's"
    assert after[f"{CASE}/meta.json"] != first[f"{CASE}/meta.json"]  # seed 2 replaced seed 1
    assert read_case(earlier, "s0000_c00").meta["batch_seed"] == 2
    assert json.loads(after["summary.json"])["outputs"] == WRITES
    assert not any(k.startswith(STAGING_PREFIX) for k in after)


def test_a_run_of_another_subject_removes_the_earlier_runs_folders(earlier, fake_solver, tmp_path):
    from ._subject_files import write_phantom_files

    spec = write_phantom_files(tmp_path / "in", "pat")
    res = runner.invoke(app, ["simulate", "--image", spec["image"], "--brain-mask", spec["brain_mask"],
                              "--tumour", spec["tumour"], "--out", str(earlier), "--resolution", "6"])
    assert res.exit_code == 0, res.output
    assert list_cases(earlier) == ["pat_image_c00"]
    assert not (earlier / "subjects" / "s0000").exists() and not (earlier / CASE).exists()
    assert (earlier / "notes.txt").read_text() == "the user's" and (earlier / "cases" / "README").exists()


@pytest.mark.parametrize("name", ["dataset.json", f"{CASE}/meta.json", "subjects/s0000/t1.nii.gz"])
def test_a_users_file_at_an_output_name_is_refused_before_the_simulation(tmp_path, fake_solver, name):
    out = tmp_path / "out"
    (out / name).parent.mkdir(parents=True)
    (out / name).write_text("the user's")
    before = _snapshot(out)
    line = _error_line(_simulate(out))
    assert str(out / name) in line and "brainshift did not write" in line, line
    assert fake_solver["simulate"] == 0
    assert _snapshot(out) == before


def test_a_dataset_folder_without_a_manifest_is_refused(tmp_path, fake_solver):
    """A folder written by an older brainshift or by simulate-batch (no summary.json) is not overwritten."""
    out = tmp_path / "out"
    assert _simulate(out).exit_code == 0
    (out / "summary.json").unlink()
    before = _snapshot(out)
    line = _error_line(_simulate(out, seed=3))
    assert "brainshift did not write" in line and fake_solver["simulate"] == 1
    assert _snapshot(out) == before
