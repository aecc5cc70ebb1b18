"""`brainshift atlas` and `brainshift infer -m atlas` end to end on a small phantom, and their bad inputs."""

from __future__ import annotations

import json
import shutil

import nibabel as nib
import numpy as np
import pytest
from tests.simulate._subject_files import write_phantom_files
from typer.testing import CliRunner

from brainshift.cli import app

runner = CliRunner()
CONFIG = "atlas:\n  design: grid\n  gravity_cone_deg: 25.0\n" \
         "  resolution_mm: 6.0\n  contact_models: [unilateral]\n  drainage_fractions: [0.3, 0.6]\n" \
         "  n_ring_directions: 2\n"


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """A phantom's files and its atlas (built once for the module, one LocalCluster worker)."""
    tmp = tmp_path_factory.mktemp("atlas_cli")
    spec = write_phantom_files(tmp / "in", "ph")
    cfg = tmp / "atlas.yaml"
    cfg.write_text(CONFIG)
    res = runner.invoke(app, ["atlas", "-p", spec["image"], "--brain-mask", spec["brain_mask"], "--tumour",
                              spec["tumour"], "--ventricles", spec["ventricles"], "--config", str(cfg), "-o",
                              str(tmp / "atlas"), "--workers", "1", "--no-progress"])
    assert res.exit_code == 0, res.output
    assert "6 solves run" in res.output and "components" in res.output
    return tmp, spec


def _keypoints(tmp, spec, n=12, seed=0, outside=False):
    brain = np.asarray(nib.load(spec["brain_mask"]).dataobj) > 0
    tumour = np.asarray(nib.load(spec["tumour"]).dataobj) > 0
    idx = np.argwhere(brain & ~tumour)
    rng = np.random.default_rng(seed)
    pts = idx[rng.choice(len(idx), n, replace=False)].astype(float)
    if outside:
        pts[3] = [1.0, 1.0, 1.0]
    d = np.stack([0.3 * np.ones(n), -0.2 * np.ones(n), 0.5 * np.sin(pts[:, 0] / 5.0)], 1)
    path = tmp / f"kp_{seed}_{outside}.csv"
    path.write_text("x,y,z,dx,dy,dz\n" + "\n".join(",".join(f"{v:.4f}" for v in row)
                                                  for row in np.c_[pts, d]) + "\n")
    return path, pts, d


def test_infer_with_the_atlas_writes_the_fit_and_honours_keypoints(built, no_default_weights):
    tmp, spec = built
    kp, pts, d = _keypoints(tmp, spec)
    out = tmp / "out_atlas"
    res = runner.invoke(app, ["infer", "-p", spec["image"], "-k", str(kp), "-m", "atlas", "--atlas",
                              str(tmp / "atlas"), "-f", "npz", "-o", str(out), "-q", "--no-refine"])
    assert res.exit_code == 0, res.output
    summary = json.loads((out / "summary.json").read_text())
    assert summary["interpolation"] == "atlas" and summary["inputs"]["atlas"] == str(tmp / "atlas")
    fit = summary["atlas_fit"]
    assert fit["n_keypoints"] == 12 and fit["tau_mm2"] > 0 and fit["member_weights"]
    assert fit["prior"] == "scaled-atlas+matern+contact" and "kernel" in fit  # the default prior, hyperparameters
    assert fit["kernel"]["hyper_rule"] == "average" and np.isfinite(fit["kernel"]["mean_scale"])
    # 12 keypoints: fewer than the skull-held prior needs (CONTACT_MIN_KEYPOINTS), so the free prior alone
    assert fit["kernel"]["skull_points"] == 0 and fit["kernel"]["contact_share"] == 0.0
    members = json.loads((tmp / "atlas" / "atlas.json").read_text())["members"]
    assert all(len(m["entry_point_ras"]) == 3 for m in members)  # the craniotomy is recorded
    field = np.load(out / "initial_disp_field.npz")["field"]
    at = field[(slice(None),) + tuple(np.round(pts).astype(int).T)].T
    assert np.abs(at - d).mean() < 0.1  # the residual spline makes the field honour the keypoints
    # --atlas-prior atlas: the members' prior alone, recorded as such
    out2 = tmp / "out_atlas_prior"
    res = runner.invoke(app, ["infer", "-p", spec["image"], "-k", str(kp), "-m", "atlas", "--atlas",
                              str(tmp / "atlas"), "--atlas-prior", "atlas", "-f", "npz", "-o", str(out2), "-q",
                              "--no-refine"])
    assert res.exit_code == 0, res.output
    fit2 = json.loads((out2 / "summary.json").read_text())["atlas_fit"]
    assert fit2["prior"] == "atlas" and "kernel" not in fit2


@pytest.mark.parametrize("case, message", [
    ("no_atlas", "--atlas FOLDER"),
    ("atlas_without_method", "only with -m atlas"),
    ("outside", "inside the atlas's brain"),
    ("corrupt", "corrupt or incomplete"),
    ("other_image", "other voxel values"),
    ("missing", "no such folder"),
    ("bad_prior", "--atlas-prior one of"),
    ("prior_without_method", "--atlas-prior only with -m atlas"),
])
def test_atlas_bad_inputs_are_one_line_exit_2(built, no_default_weights, case, message):
    tmp, spec = built
    kp, _, _ = _keypoints(tmp, spec, outside=case == "outside")
    image = spec["image"]
    atlas = tmp / "atlas"
    args = ["-m", "atlas", "--atlas", str(atlas)]
    if case == "no_atlas":
        args = ["-m", "atlas"]
    elif case == "atlas_without_method":
        args = ["-m", "tps", "--atlas", str(atlas)]
    elif case == "corrupt":
        bad = tmp / f"atlas_{case}"
        shutil.copytree(atlas, bad, dirs_exist_ok=True)
        (bad / "basis.npz").write_bytes(b"not a zip")
        args = ["-m", "atlas", "--atlas", str(bad)]
    elif case == "other_image":
        img = nib.load(spec["image"])
        data = np.asarray(img.dataobj) * 1.5
        image = str(tmp / "other.nii.gz")
        nib.save(nib.Nifti1Image(data.astype(np.float32), img.affine), image)
    elif case == "missing":
        args = ["-m", "atlas", "--atlas", str(tmp / "nothing_here")]
    elif case == "bad_prior":
        args = ["-m", "atlas", "--atlas", str(atlas), "--atlas-prior", "gaussian"]
    elif case == "prior_without_method":
        args = ["-m", "tps", "--atlas-prior", "atlas"]
    out = tmp / f"out_{case}"
    res = runner.invoke(app, ["infer", "-p", image, "-k", str(kp), *args, "-f", "npz", "-o", str(out), "-q",
                              "--no-refine"])
    assert res.exit_code == 2, res.output
    lines = [ln for ln in res.output.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and message in lines[0], res.output
    assert not out.exists() or not any(out.iterdir())


def test_atlas_command_bad_inputs(tmp_path):
    spec = write_phantom_files(tmp_path / "in", "ph")
    res = runner.invoke(app, ["atlas", "-p", spec["image"], "--brain-mask", spec["brain_mask"],
                              "--craniotomy-centre", "1,2", "-o", str(tmp_path / "a")])
    assert res.exit_code == 2 and "three numbers" in res.output
    cfg = tmp_path / "bad.yaml"
    cfg.write_text("atlas:\n  contact_models: [glue]\n")
    res = runner.invoke(app, ["atlas", "-p", spec["image"], "--brain-mask", spec["brain_mask"], "--config",
                              str(cfg), "-o", str(tmp_path / "a")])
    assert res.exit_code == 2 and "contact" in res.output
    assert not (tmp_path / "a").exists()


def test_compensate_net_atlas_runs_the_safeguards_on_atlas_folds(built, tiny_default_weights):
    """The network refines the atlas field; the safeguards' folds re-fit the atlas (not a TPS)."""
    from brainshift.atlas import load_atlas
    from brainshift.compensate import compensate
    from brainshift.io.images import read_image
    from brainshift.model.checkpoint import load_weights

    tmp, spec = built
    _, pts, d = _keypoints(tmp, spec, n=16, seed=3)
    image = read_image(spec["image"])
    atlas = load_atlas(tmp / "atlas")
    res = compensate(image, keypoints=(pts, d), method="atlas", atlas=atlas,
                     model=load_weights(tiny_default_weights))
    assert res.method == "atlas" and res.atlas_fit is not None and res.safeguards is not None
    assert 0.0 <= res.safeguards["alpha"] <= 1.0
    at = res.refined_field[(slice(None),) + tuple(np.round(pts).astype(int).T)].T
    at0 = res.initial_field[(slice(None),) + tuple(np.round(pts).astype(int).T)].T
    assert np.abs(at - d).mean() <= np.abs(at0 - d).mean() + 0.05  # keypoint consistency


@pytest.mark.parametrize("text,message", [
    ("atlas:\n  n_solves: abc\n", "expected n_solves in the atlas config as an integer, got 'abc'"),
    ("atlas:\n  n_solves: 2.7\n", "expected n_solves in the atlas config as an integer, got 2.7"),
    ("atlas:\n  seed: 1.5\n", "expected seed in the atlas config as an integer, got 1.5"),
    ("atlas:\n  drainage_fractions: 0.5\n", "expected drainage_fractions in the atlas config as a list of numbers"),
    ("atlas:\n  contact_models: unilateral\n",
     "expected contact_models in the atlas config as a list of strings, got 'unilateral'"),
    ("atlas:\n  energy: 'nan'\n", "expected energy in the atlas config as a finite number, got 'nan'"),
    ("atlas:\n  energy:\n", "expected energy in the atlas config as a finite number, got null"),
    ("atlas:\n  falx_probability: abc\n", "expected falx_probability in the atlas config as a finite number or null"),
    ("atlas:\n  resection: 'no'\n", "expected resection in the atlas config as true or false, got 'no'"),
    ("atlas:\n  simulation: 3\n", "expected simulation in the atlas config as a mapping, got 3"),
    ("atlas:\n  simulation: {foo: 1}\n", "under simulation: in the atlas config, got unknown ['foo']"),
    ("atlas:\n  simulation: {falx: 'yes'}\n",
     "expected falx in the atlas config's simulation: as true or false, got 'yes'"),
    ("atlas: hello\n", "expected the section atlas: of"),
    (b"\xff\xfeatlas: {}\n", "expected a UTF-8 text atlas config file (YAML or JSON), got"),
])
def test_atlas_config_values_of_the_wrong_type_are_one_line_exit_2(tmp_path, text, message):
    # were TypeError / ValueError / UnicodeDecodeError tracebacks, or used as they came (n_solves 2.7, seed 1.5,
    # resection 'no' as true)
    cfg = tmp_path / "atlas.yaml"
    cfg.write_bytes(text if isinstance(text, bytes) else text.encode())
    res = runner.invoke(app, ["atlas", "-p", str(tmp_path / "p.nii.gz"), "--brain-mask", str(tmp_path / "b.nii.gz"),
                              "--config", str(cfg), "-o", str(tmp_path / "a")])
    assert res.exit_code == 2, res.output
    assert res.output.startswith("error: ") and len(res.output.splitlines()) == 1, res.output
    assert message in res.output, res.output
    assert not (tmp_path / "a").exists()


@pytest.mark.parametrize("workers", ["0", "-2"])
def test_atlas_command_refuses_a_worker_count_below_one_before_any_work(tmp_path, workers):
    # --workers 0 silently became one worker per core (a full build started); -2 reached Dask's LocalCluster
    spec = write_phantom_files(tmp_path / "in", "ph")
    res = runner.invoke(app, ["atlas", "-p", spec["image"], "--brain-mask", spec["brain_mask"], "--workers",
                              workers, "-o", str(tmp_path / "a"), "--no-progress"])
    assert res.exit_code == 2, res.output
    assert res.output == f"error: expected --workers >= 1 (or omitted: one per CPU core), got {workers}\n"
    assert not (tmp_path / "a").exists()
