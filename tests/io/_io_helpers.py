"""Helpers shared by the I/O tests (a uniquely named module; the folder is not a package, see conftest.py)."""

from __future__ import annotations

import numpy as np

OBLIQUE_SHAPE = (20, 24, 12)



def oblique_affine_matrix(angle_deg: float = 20.0, zooms=(0.5, 0.5, 3.0), origin=(90.0, -126.0, -72.0)) -> np.ndarray:
    """4x4 voxel-to-RAS affine: rotation about z by ``angle_deg`` times ``diag(zooms)``, then ``origin``."""
    t = np.deg2rad(angle_deg)
    rot = np.array([[np.cos(t), -np.sin(t), 0.0], [np.sin(t), np.cos(t), 0.0], [0.0, 0.0, 1.0]])
    a = np.eye(4)
    a[:3, :3] = rot @ np.diag(zooms)
    a[:3, 3] = origin
    return a


def smooth_field(shape, amplitude: float = 1.5) -> np.ndarray:
    """A smooth, non-constant float32 (3, I, J, K) field in voxel units (different in each component)."""
    i, j, k = np.meshgrid(*[np.linspace(0.0, 1.0, s) for s in shape], indexing="ij")
    f = np.stack([
        amplitude * np.sin(np.pi * i) * np.cos(np.pi * j),
        0.5 * amplitude * np.sin(np.pi * j) * (k - 0.3),
        0.3 * amplitude * np.cos(np.pi * k) * i,
    ])
    return f.astype(np.float32)


def write_small_case(folder) -> tuple:
    """A small preop image (``preop.nii.gz``, 16 x 18 x 14, 1.5 mm) and a keypoint table (``kp.csv``, 10
    keypoints, voxel frame) in ``folder``: the valid inputs that the command-line tests of bad inputs pair with."""
    from pathlib import Path

    import nibabel as nib

    folder = Path(folder)
    rng = np.random.default_rng(0)
    shape = (16, 18, 14)
    data = (rng.random(shape) + 0.1).astype(np.float32)
    affine = np.diag([1.5, 1.5, 1.5, 1.0])
    affine[:3, 3] = [-10.0, -12.0, -8.0]
    image = folder / "preop.nii.gz"
    nib.save(nib.Nifti1Image(data, affine), str(image))
    pts = rng.uniform([2, 2, 2], [s - 3 for s in shape], size=(10, 3))
    rows = ["x,y,z,dx,dy,dz"] + [f"{p[0]:.3f},{p[1]:.3f},{p[2]:.3f},0.5,-0.25,0.3" for p in pts]
    table = folder / "kp.csv"
    table.write_text("\n".join(rows) + "\n")
    return image, table


def assert_one_line_error(result, out_dir, *fragments) -> str:
    """A command that refused its input: exit code 2, no traceback, exactly one ``error:`` line holding every
    fragment, and nothing left in ``out_dir`` (absent or empty). Returns the error line."""
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output, result.output
    lines = [ln for ln in result.output.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1, result.output
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    assert not out_dir.exists() or not any(out_dir.iterdir()), sorted(p.name for p in out_dir.iterdir())
    return lines[0]


def run_infer(tmp_path, *, image=None, initial_field=None):
    """``brainshift infer --no-refine`` on :func:`write_small_case`'s case in ``tmp_path`` with ``image`` in place
    of its image (driven by its keypoints) or ``initial_field`` as ``-i``. Returns ``(result, output folder)``."""
    from typer.testing import CliRunner

    from brainshift.cli import app

    small_image, table = write_small_case(tmp_path)
    out = tmp_path / "out"
    drive = ["-i", str(initial_field)] if initial_field is not None else ["-k", str(table)]
    args = ["infer", "-p", str(image if image is not None else small_image), *drive, "--no-refine", "-q",
            "-o", str(out)]
    return CliRunner().invoke(app, args), out
