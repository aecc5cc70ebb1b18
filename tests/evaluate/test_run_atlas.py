"""``evaluate --atlases``: the atlas methods on a phantom dataset whose case the simulator made within the
atlas's own modelling choices, and their bad inputs."""

from __future__ import annotations

import math
import shutil

import numpy as np
import pytest
from tests.simulate.phantoms import ellipsoid_subject, mirror_subject
from typer.testing import CliRunner

from brainshift.cli import app
from brainshift.errors import BrainshiftError, GeometryError, InputFileError
from brainshift.evaluate.run import ROW_COLUMNS, evaluate_dataset
from brainshift.evaluate.tables import read_per_case_csv
from brainshift.simulate.atlas import AtlasConfig, build_atlas, plan_solves
from brainshift.simulate.dataset import read_subject, write_case, write_subject

from .test_run import _tiny_weights

#: A tiny atlas: 1 contact model x 2 drainage levels x 3 gravity directions at 6 mm (6 solves, seconds).
CFG = AtlasConfig(design="grid", gravity_cone_deg=25.0,
                  resolution_mm=6.0, contact_models=["unilateral"], drainage_fractions=[0.3, 0.6],
                  n_ring_directions=2)
#: The case's parenchyma is stiffer than the atlas's solves (1225 Pa) but inside its stiffness range
#: (500-3000 Pa): the linear solution scales by 1225 / 2000, so the case lies in the atlas's span without being
#: one of its members.
CASE_SHEAR_PA = 2000.0
runner = CliRunner()


def _simulate(subject, solve):
    """The simulator's field and cavity for one planned solve of CFG, at CASE_SHEAR_PA."""
    from brainshift.simulate.atlas import solve_parameters
    from brainshift.simulate.case import simulate_case

    cfg = AtlasConfig(**{**CFG.to_dict(), "shear_modulus_pa": CASE_SHEAR_PA}).simulation_config(
        solve["contact_model"])
    res = simulate_case(subject, cfg, solve_parameters(solve))
    return res.field_vox, res.cavity_mask


@pytest.fixture(scope="module")
def atlas_dataset(tmp_path_factory):
    """A dataset of two phantom subjects (``ellipsoid``, its mirror image ``mirror``), one simulated case each, and
    ``atlases/ellipsoid`` (only that subject's atlas, built from the preop image as written)."""
    root = tmp_path_factory.mktemp("atlas_eval")
    data = root / "data"
    subject = ellipsoid_subject()
    mirror = mirror_subject(subject)
    mirror.subject_id = "mirror"
    solve = plan_solves(subject, CFG)[4]  # drainage 0.6, gravity tilted 25 degrees off the approach
    field, cavity = _simulate(subject, solve)
    assert float(np.abs(field).max()) > 1.0  # the tissue moved by more than a voxel somewhere
    write_subject(data, subject)
    write_case(data, "ellipsoid_000", "ellipsoid", field, subject.image.affine, cavity, {"solve": solve["id"]})
    write_subject(data, mirror)
    flipped = np.ascontiguousarray(field[:, ::-1]) * np.array([-1.0, 1.0, 1.0], np.float32)[:, None, None, None]
    from brainshift.volume import Volume

    write_case(data, "mirror_000", "mirror", flipped, subject.image.affine,
               Volume(np.ascontiguousarray(cavity.data[::-1]), cavity.affine, "label"), {"mirror": True})
    atlases = root / "atlases"
    build_atlas(atlases / "ellipsoid", read_subject(data, "ellipsoid"), CFG, n_workers=1, processes=False,
                progress=False)
    return data, atlases


def test_atlas_beats_tps_on_a_case_within_its_choices(atlas_dataset):
    data, atlases = atlas_dataset
    rows = evaluate_dataset(data, ["none", "tps", "atlas"], atlases=atlases, cases=1, n_keypoints=15, seed=1,
                            overlap=False, progress=False)
    by = {r["method"]: r for r in rows}
    assert list(by) == ["none", "tps", "atlas"] and tuple(rows[2]) == ROW_COLUMNS
    for k in ("mse_mm2", "mae_mm", "p95_mm", "tre_mm", "pct_jacobian_nonpositive", "time_s"):
        assert math.isfinite(by["atlas"][k]), k
    # the case is a scaled member of the atlas's span: its fit is far better than a spline of 15 keypoints
    assert by["atlas"]["mse_mm2"] < 0.3 * by["tps"]["mse_mm2"] < 0.3 * by["none"]["mse_mm2"]
    assert by["atlas"]["tre_mm"] < by["tps"]["tre_mm"]
    assert by["atlas"]["time_s"] > 0


def test_net_atlas_refines_the_atlas_field(atlas_dataset, tmp_path):
    data, atlases = atlas_dataset
    kw = dict(atlases=atlases, cases=1, n_keypoints=15, seed=1, overlap=False, progress=False)
    # a network whose residual head is zero returns its initial field: net-atlas is the atlas field exactly
    w0 = _tiny_weights(tmp_path / "zero.safetensors", zero_residual=True)
    rows = evaluate_dataset(data, ["atlas", "net-atlas"], weights=w0, safeguards=False, **kw)
    atlas_row, net_row = rows
    for k in ("mse_mm2", "mae_mm", "tre_mm", "pct_jacobian_nonpositive"):
        assert net_row[k] == pytest.approx(atlas_row[k], rel=1e-6, abs=1e-9), k
    assert net_row["time_s"] >= atlas_row["time_s"]
    # a random network under the safeguards (folds re-fit the atlas): finite, and the atlas row is unchanged
    w1 = _tiny_weights(tmp_path / "rand.safetensors", zero_residual=False)
    rows = evaluate_dataset(data, ["atlas", "net-atlas"], weights=w1, **kw)
    assert rows[0]["mse_mm2"] == pytest.approx(atlas_row["mse_mm2"], rel=1e-9)
    assert all(math.isfinite(rows[1][k]) for k in ("mse_mm2", "tre_mm", "pct_jacobian_nonpositive"))


def test_atlas_methods_need_atlases_and_one_per_subject(atlas_dataset, tmp_path):
    data, atlases = atlas_dataset
    with pytest.raises(BrainshiftError, match="expected --atlases DIR .* for the methods atlas, got none"):
        evaluate_dataset(data, ["tps", "atlas"], progress=False)
    # the second subject has no atlas folder: named in the error
    with pytest.raises(InputFileError, match="expected an atlas of subject mirror at .*mirror .*no such folder"):
        evaluate_dataset(data, ["atlas"], atlases=atlases, n_keypoints=10, overlap=False, progress=False)
    # an atlas built on another image (the unmirrored brain) for that subject: named too
    other = tmp_path / "atlases"
    shutil.copytree(atlases / "ellipsoid", other / "ellipsoid")
    shutil.copytree(atlases / "ellipsoid", other / "mirror")
    with pytest.raises(GeometryError, match="subject mirror .*other voxel values"):
        evaluate_dataset(data, ["atlas"], atlases=other, n_keypoints=10, overlap=False, progress=False)
    with pytest.raises(InputFileError, match="expected --atlases to be a folder"):
        evaluate_dataset(data, ["atlas"], atlases=tmp_path / "nowhere", progress=False)


def test_evaluate_command_with_atlases(atlas_dataset, tmp_path, no_default_weights):
    data, atlases = atlas_dataset
    out = tmp_path / "eval"
    res = runner.invoke(app, ["evaluate", "--data", str(data), "--atlases", str(atlases), "--out", str(out),
                              "--num-kpts", "12", "--cases", "1", "--no-overlap", "-q"])
    assert res.exit_code == 0, res.output
    # without weights the default methods are the classical ones and the atlas
    rows = read_per_case_csv(out / "metrics_per_case.csv")
    assert [r["method"] for r in rows] == ["linear", "tps", "atlas"]
    assert "| atlas | 1 |" in res.output
    by = {r["method"]: r for r in rows}
    assert by["atlas"]["mse_mm2"] < by["tps"]["mse_mm2"]


@pytest.mark.parametrize("args, message", [
    (["--methods", "tps,net-atlas"], "error: expected --atlases DIR"),
    (["--methods", "atlas", "--atlases", "ATLASES", "--cases", "2"], "error: expected an atlas of subject mirror"),
])
def test_evaluate_command_atlas_errors_are_one_line_exit_2(atlas_dataset, tmp_path, args, message):
    data, atlases = atlas_dataset
    args = [str(atlases) if a == "ATLASES" else a for a in args]
    res = runner.invoke(app, ["evaluate", "--data", str(data), "--out", str(tmp_path / "o"), "--no-overlap", "-q",
                              "--num-kpts", "10", *args])
    assert res.exit_code == 2, res.output
    assert res.output.startswith(message) and len(res.output.strip().splitlines()) == 1, res.output
    assert not (tmp_path / "o").exists()
