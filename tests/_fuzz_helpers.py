"""Shared pieces of the fuzz and fault-injection tests: a tiny workspace and the checks every CLI run must pass.

The contract checked (README, "Guarantees"): every run ends with exit code 0 or 2; never a traceback; a failed
run prints exactly one ``error:`` line and leaves the output folder byte-for-byte as it was; a successful run
leaves the user's files untouched and the folder holding exactly them plus the outputs its ``summary.json``
lists (strict JSON: no NaN or Infinity).
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import nibabel as nib
import numpy as np
from typer.testing import CliRunner

from brainshift.cli import app

SHAPE = (12, 12, 12)
AFFINE = np.array([[2.0, 0, 0, -11], [0, 2.0, 0, -12], [0, 0, 2.0, -10], [0, 0, 0, 1]])
#: files of the user's in the output folder (one named like an output): never touched by any run
USER_FILES = {"notes.txt": b"mine", "initial_disp_field.h5.bak": b"my backup", "ants_inverse_disp_field.nii.gz": b"x"}

runner = CliRunner()


def good_rows(n: int = 10, seed: int = 0) -> np.ndarray:
    """``(n, 6)`` keypoints inside :data:`SHAPE` with a smooth (affine) displacement of a few voxels."""
    rng = np.random.default_rng(seed)
    pts = rng.uniform(1.5, SHAPE[0] - 2.5, size=(n, 3))
    disp = pts @ np.array([[0.03, 0, 0.01], [0, -0.02, 0], [0.01, 0, 0.02]]).T + [0.4, -0.6, 0.2]
    return np.hstack([pts, disp])


def write_table(path: Path, rows) -> Path:
    path.write_text("x,y,z,dx,dy,dz\n" + "".join(",".join(repr(float(v)) for v in r) + "\n" for r in rows))
    return path


def make_workspace(root: Path) -> dict[str, Path]:
    """``root`` with ``preop.nii.gz``, ``kp.csv`` and ``template_out`` (an earlier run's outputs + user files)."""
    rng = np.random.default_rng(3)
    data = (rng.random(SHAPE) + 0.2).astype(np.float32)
    image = root / "preop.nii.gz"
    img = nib.Nifti1Image(data, AFFINE)
    img.set_qform(AFFINE, code=1)
    nib.save(img, str(image))
    kp = write_table(root / "kp.csv", good_rows())
    template = root / "template_out"
    res = runner.invoke(app, ["infer", "-p", str(image), "-k", str(kp), "--no-refine", "-q", "-o", str(template),
                              "--save-inverse"])
    assert res.exit_code == 0, res.output
    for name, content in USER_FILES.items():
        (template / name).write_bytes(content)
    return {"root": root, "image": image, "kp": kp, "template": template}


def fresh_out(ws: dict[str, Path]) -> Path:
    """A new copy of the template output folder (an earlier run's outputs and the user's files)."""
    parent = Path(tempfile.mkdtemp(dir=ws["root"]))
    out = parent / "out"
    shutil.copytree(ws["template"], out)
    return out


def snapshot(folder: Path) -> dict[str, bytes | None]:
    """Every entry under ``folder`` (hidden ones included): relative path -> bytes (``None`` for directories)."""
    if not folder.exists():
        return {}
    return {str(p.relative_to(folder)): (None if p.is_dir() else p.read_bytes()) for p in sorted(folder.rglob("*"))}


def _strict_json(text: str):
    def refuse(name):
        raise AssertionError(f"summary.json holds {name}, which is not JSON")

    return json.loads(text, parse_constant=refuse)


def check_contract(res, out: Path, before: dict[str, bytes | None]) -> str:
    """Assert the CLI contract for one run (see the module docstring); return ``"ok"`` or the error line."""
    assert res.exit_code in (0, 2), f"exit {res.exit_code}: {res.output}\n{res.exception!r}"
    assert "Traceback" not in res.output, res.output
    if res.exit_code == 2:
        lines = [ln for ln in res.stderr.splitlines() if ln.strip() and not ln.startswith("warning:")]
        assert len(lines) == 1 and lines[0].startswith("error: "), res.stderr
        assert "wrote" not in res.stdout, res.stdout
        assert snapshot(out) == before, f"a failed run changed {out}: {lines[0]}"
        return lines[0]
    after = snapshot(out)
    for name, content in USER_FILES.items():
        if name in before:
            assert after.get(name) == content, f"the user's {name} was changed or deleted"
    summary = _strict_json((out / "summary.json").read_text())
    listed = set(summary["outputs"])
    assert "summary.json" in listed
    expected = {n for n in before if n in USER_FILES} | listed
    assert set(after) == expected, f"expected exactly {sorted(expected)} in {out}, got {sorted(after)}"
    return "ok"
