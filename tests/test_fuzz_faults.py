"""Fault injection at every write step: a full disk, an exception, a killed process.

``infer``: the output folder is left byte-for-byte as it was (an earlier run's outputs and the user's files in
it), with one error line naming the file and the cause; a killed run leaves only a hidden staging folder, which
the next run removes. ``simulate-batch``: a case interrupted mid-write is never listed as complete (so neither
``--resume`` nor the training loader takes it). ``train``: a run killed while saving resumes from the last
complete checkpoint.
"""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from _fuzz_helpers import check_contract, fresh_out, make_workspace, runner, snapshot
from brainshift.cli import app
from brainshift.io.output_set import STAGING_PREFIX, OutputSet

#: infer with every optional output, into a folder holding an earlier run's outputs and the user's files
WRITES = ["initial_disp_field.h5", "initial_inverse_disp_field.h5", "preop_warped_to_intraop.nii.gz", "summary.json"]


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    return make_workspace(tmp_path_factory.mktemp("faults"))


def _args(ws, out: Path) -> list[str]:
    return ["infer", "-p", str(ws["image"]), "-k", str(ws["kp"]), "--no-refine", "-q", "-o", str(out),
            "--save-inverse", "--save-warped", "-f", "h5"]


def _faulty_write(monkeypatch, fail_at: int, exc: BaseException, partial: bool = True) -> list[str]:
    """Make the ``fail_at``-th output write leave a partial file and raise ``exc``; return the names written."""
    calls: list[str] = []
    original = OutputSet.write

    def write(self, name, writer):
        calls.append(name)
        if len(calls) - 1 == fail_at:
            def broken(path):
                if partial:
                    path.write_bytes(b"\x89HDF partial")
                raise exc
            return original(self, name, broken)
        return original(self, name, writer)

    monkeypatch.setattr(OutputSet, "write", write)
    return calls


@pytest.mark.parametrize("step", range(len(WRITES)))
def test_full_disk_at_each_write_leaves_the_folder_as_it_was(ws, monkeypatch, step):
    out = fresh_out(ws)
    before = snapshot(out)
    calls = _faulty_write(monkeypatch, step, OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)))
    res = runner.invoke(app, _args(ws, out))
    line = check_contract(res, out, before)
    assert calls == WRITES[: step + 1]
    assert WRITES[step] in line and "No space left on device" in line, line


def test_hdf5_full_disk_message_is_one_line_naming_the_file(ws, monkeypatch):
    """h5py reports a full disk as an OSError without errno and with HDF5's diagnostics across lines."""
    out = fresh_out(ws)
    before = snapshot(out)
    message = ("Can't synchronously write data (file write failed: time = Wed Dec  2, filename = 'x.h5', file "
               "descriptor = 5, errno = 28, error message = 'No space left on device', buf = 0x1)\n"
               "HDF5-DIAG: Error detected in HDF5 (1.14.6) thread 0:\n  #000: H5D.c line 1390 in H5Dwrite()")
    _faulty_write(monkeypatch, 0, OSError(message))
    line = check_contract(runner.invoke(app, _args(ws, out)), out, before)
    assert "initial_disp_field.h5" in line and "No space left on device" in line and "HDF5-DIAG" not in line


@pytest.mark.parametrize("step", range(len(WRITES)))
def test_exception_at_each_write_leaves_the_folder_as_it_was(ws, monkeypatch, step):
    from brainshift.pipeline import InferOptions, run_infer

    out = fresh_out(ws)
    before = snapshot(out)
    _faulty_write(monkeypatch, step, RuntimeError("injected failure"), partial=step % 2 == 0)
    opts = InferOptions(preop_scan=ws["image"], kpt_disps=ws["kp"], output=out, refine=False, verbose=False,
                        save_inverse=True, save_warped=True)
    with pytest.raises(Exception, match="injected failure|expected to write"):
        run_infer(opts)
    assert snapshot(out) == before


def test_interrupt_between_writes_is_one_line_and_changes_nothing(ws, monkeypatch):
    out = fresh_out(ws)
    before = snapshot(out)
    _faulty_write(monkeypatch, 1, KeyboardInterrupt())
    res = runner.invoke(app, _args(ws, out))
    assert res.exit_code == 130 and "Traceback" not in res.output
    assert [ln for ln in res.stderr.splitlines() if ln.strip()] == [
        "error: interrupted; nothing was written (outputs appear only when a run completes)"]
    assert snapshot(out) == before


@pytest.mark.parametrize("step", range(4 + len(WRITES)))
def test_full_disk_at_each_rename_of_the_commit_leaves_the_folder_as_it_was(ws, monkeypatch, step):
    """The commit sets an earlier run's 3 outputs aside and moves the 4 new ones in: a failure at any rename
    (or at the atomic rename inside a writer) is undone."""
    out = fresh_out(ws)
    before = snapshot(out)
    real_replace = os.replace
    count = {"n": 0}

    def replace(src, dst):
        count["n"] += 1
        if count["n"] - 1 == step:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(dst))
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    res = runner.invoke(app, _args(ws, out))
    line = check_contract(res, out, before)
    assert "No space left on device" in line, line


_CHILD = textwrap.dedent("""
    import json, os, resource, signal, sys
    from typer.testing import CliRunner
    from brainshift.cli import app
    from brainshift.io.output_set import OutputSet
    mode, arg, args = sys.argv[1], int(sys.argv[2]), json.loads(sys.argv[3])
    if mode == "kill":  # SIGKILL (no clean-up runs) inside the arg-th write, after a partial file is on disk
        original, calls = OutputSet.write, []
        def write(self, name, writer):
            calls.append(name)
            if len(calls) - 1 == arg:
                def killed(path):
                    path.write_bytes(b"partial")
                    os.kill(os.getpid(), signal.SIGKILL)
                return original(self, name, killed)
            return original(self, name, writer)
        OutputSet.write = write
        CliRunner().invoke(app, args)
    else:  # a real full file system for every library (h5py, zlib, json): files may not exceed arg bytes
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
        resource.setrlimit(resource.RLIMIT_FSIZE, (arg, hard))
        res = CliRunner().invoke(app, args)
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        print(json.dumps({"exit": res.exit_code, "stdout": res.stdout, "stderr": res.stderr,
                          "traceback": "Traceback" in res.output}))
""")


def _child(mode: str, arg: int, args: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", _CHILD, mode, str(arg), json.dumps(args)], capture_output=True,
                          text=True, timeout=300)


@pytest.mark.parametrize("step", range(len(WRITES)))
def test_killed_at_each_write_leaves_only_a_staging_folder_that_the_next_run_removes(ws, step):
    out = fresh_out(ws)
    before = snapshot(out)
    proc = _child("kill", step, _args(ws, out))
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    after = snapshot(out)
    visible = {k: v for k, v in after.items() if not k.startswith(STAGING_PREFIX)}
    assert visible == before, "a killed run changed the visible files"
    assert any(k.startswith(STAGING_PREFIX) for k in after)
    res = runner.invoke(app, _args(ws, out))  # the next run completes and removes the abandoned staging folder
    assert res.exit_code == 0, res.output
    assert not any(k.startswith(STAGING_PREFIX) for k in snapshot(out))


@pytest.mark.parametrize("limit", [0, 2_000, 20_000, 10**6])
def test_real_full_file_system_at_several_sizes(ws, limit):
    """RLIMIT_FSIZE makes every write past ``limit`` bytes fail (EFBIG) inside h5py, zlib and json alike; HDF5
    itself crashed the process (SIGSEGV on closing the file) before fields were built in memory first."""
    out = fresh_out(ws)
    before = snapshot(out)
    proc = _child("fsize", limit, _args(ws, out))
    assert proc.returncode == 0, f"the process died ({proc.returncode}): {proc.stderr[-2000:]}"
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    assert not got["traceback"], got
    if limit >= 10**6:  # room for every file: the run completes
        assert got["exit"] == 0, got
        assert json.loads((out / "summary.json").read_text())["outputs"] == WRITES
        return
    assert got["exit"] == 2, got
    lines = [ln for ln in got["stderr"].splitlines() if ln.strip() and not ln.startswith("warning:")]
    assert len(lines) == 1 and lines[0].startswith("error: expected to write "), got["stderr"]
    assert "File too large" in lines[0] or "No space" in lines[0], lines[0]
    assert snapshot(out) == before


# --------------------------------------------------------------------------------------------- simulate-batch

def test_a_case_interrupted_mid_write_is_never_complete(tmp_path, monkeypatch):
    import brainshift.simulate.dataset as dataset
    from brainshift.errors import InputFileError
    from brainshift.volume import Volume

    field = np.zeros((3, 4, 4, 4), np.float32)
    cavity = Volume(np.zeros((4, 4, 4), np.uint8), np.eye(4), "label")
    dataset.write_case(tmp_path, "c0", "s0", field, np.eye(4), cavity, {"seed": 1})
    assert dataset.list_cases(tmp_path) == ["c0"]

    def killed(*a, **k):
        raise KeyboardInterrupt  # the worker dies between the field and the mask

    monkeypatch.setattr(dataset, "_write_nifti", killed)
    for case in ("c1", "c0"):  # a new case, and a complete case being rewritten
        with pytest.raises(KeyboardInterrupt):
            dataset.write_case(tmp_path, case, "s0", field + 1, np.eye(4), cavity, {"seed": 2})
    assert dataset.list_cases(tmp_path) == []  # --resume re-simulates both; the training loader sees neither
    with pytest.raises(InputFileError, match="complete case"):
        dataset.read_case(tmp_path, "c0")


# ------------------------------------------------------------------------------------------------------ train

def test_a_run_killed_while_saving_resumes_from_the_last_complete_checkpoint(tmp_path, monkeypatch):
    import torch

    from brainshift.model.network import NetworkConfig, build_network
    from brainshift.train import loop

    cfg = NetworkConfig(features=(4, 8))
    model = build_network(cfg)
    opt = torch.optim.Adam(model.parameters())
    path = tmp_path / "last.pt"
    kw = dict(best_val_mse=1.0, best_epoch=1, history=[], net_config=cfg)
    loop._save_state(path, model, opt, epoch=1, step=10, **kw)
    real_save = torch.save

    def killed(obj, f, *a, **k):
        with open(f, "wb") as fh:
            fh.write(b"PK\x03\x04 partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", killed)
    with pytest.raises(KeyboardInterrupt):
        loop._save_state(path, model, opt, epoch=2, step=20, **kw)
    monkeypatch.setattr(torch, "save", real_save)
    state = loop.load_state(path)
    assert (state["epoch"], state["step"]) == (1, 10)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.pt"]
