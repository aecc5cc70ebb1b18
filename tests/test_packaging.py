"""The package as users install it: a wheel that ships its default model and configs and runs from anywhere.

The wheel is built from this checkout (``pip wheel --no-deps --no-build-isolation``, no network), then
unpacked into a temporary folder and run as ``python -m brainshift infer`` from another working directory
with that folder first on ``PYTHONPATH`` (so the unpacked wheel, not the editable checkout, is imported).
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest

from brainshift.resources import DEFAULT_WEIGHTS, config_names, config_path, resolve_weights

ROOT = Path(__file__).resolve().parents[1]


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _build_wheel(out: Path) -> Path:
    """Build the wheel of this checkout into ``out`` (one build per test run: only one test calls this, so
    pytest-xdist workers never build in the same source tree at once)."""
    res = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                          "-w", str(out), str(ROOT)], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    wheels = list(out.glob("brainshift-*.whl"))
    assert len(wheels) == 1, wheels
    return wheels[0]


def test_wheel_ships_its_model_and_configs_and_runs_from_another_directory(tmp_path):
    wheel = _build_wheel(tmp_path / "wheel")
    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
        shipped = z.read("brainshift/data/weights/default.safetensors")
        configs = {n.rsplit("/", 1)[1] for n in names if n.startswith("brainshift/data/configs/")}
    # the shipped model is the repository's file byte for byte (the top-level weights/ entry links to it)
    assert _sha256(shipped) == _sha256((ROOT / "weights" / "default.safetensors").read_bytes())
    assert _sha256(shipped) == _sha256(DEFAULT_WEIGHTS.read_bytes())
    assert {"train_default.yaml", "train_fast.yaml", "simulate.yaml"} <= configs
    assert configs == {f"{n}.yaml" for n in config_names()}
    assert {"brainshift/cli/__init__.py", "brainshift/__main__.py", "brainshift/compensate.py"} <= names
    _run_unpacked(wheel, tmp_path)


def test_resources_resolve_inside_the_package():
    assert DEFAULT_WEIGHTS.parent.parent == Path(__file__).resolve().parents[1] / "src" / "brainshift" / "data"
    assert resolve_weights(None) == DEFAULT_WEIGHTS
    assert config_path("train_default") == config_path("train_default.yaml")
    from brainshift.errors import InputFileError

    with pytest.raises(InputFileError, match="expected a shipped config among .*train_default"):
        config_path("nope")


def _run_unpacked(wheel: Path, tmp_path: Path) -> None:
    """Unpack ``wheel`` and run ``python -m brainshift infer`` from another directory: it must refine with the
    wheel's own default model (no -w)."""
    import nibabel as nib

    site = tmp_path / "site"
    with zipfile.ZipFile(wheel) as z:
        z.extractall(site)
    work = tmp_path / "elsewhere"
    work.mkdir()
    # a small blob image (2 mm voxels) and 8 keypoints moving by 1-2 voxels
    rng = np.random.default_rng(0)
    img = np.zeros((24, 28, 20), np.float32)
    idx = np.indices(img.shape).transpose(1, 2, 3, 0)
    for c in rng.uniform(4, 16, size=(6, 3)):
        img += np.exp(-((idx - c) ** 2).sum(-1) / 8.0).astype(np.float32)
    affine = np.diag([2.0, 2.0, 2.0, 1.0])
    nib.save(nib.Nifti1Image(img, affine), str(work / "preop.nii.gz"))
    pts = rng.uniform(3, 16, size=(8, 3))
    rows = ["x,y,z,dx,dy,dz"] + [",".join(f"{v:.3f}" for v in [*p, 1.0, 0.5, -1.0]) for p in pts]
    (work / "kp.csv").write_text("\n".join(rows) + "\n")
    env = {**os.environ, "PYTHONPATH": str(site)}
    res = subprocess.run([sys.executable, "-m", "brainshift", "infer", "-p", "preop.nii.gz", "-k", "kp.csv",
                          "-m", "tps", "-d", "cpu", "-q", "-o", "out"], cwd=work, env=env, capture_output=True,
                         text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    summary = json.loads((work / "out" / "summary.json").read_text())
    assert summary["refined"] is True  # the default model was found without -w, from another directory
    assert Path(summary["inputs"]["weights"]).resolve() == (site / "brainshift" / "data" / "weights" /
                                                             "default.safetensors").resolve()
    assert sorted(summary["outputs"]) == ["corrected_disp_field.h5", "initial_disp_field.h5", "summary.json"]
