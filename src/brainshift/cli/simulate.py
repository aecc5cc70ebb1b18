"""The ``brainshift simulate`` and ``brainshift simulate-batch`` commands.

Top-level imports are light (typer, pathlib); numpy, matplotlib and the simulator are imported inside the
commands. The library functions they call: :func:`brainshift.simulate.batch.simulate_batch`,
:func:`~brainshift.simulate.batch.read_config_file`, :func:`brainshift.simulate.preview.save_displacement_png`.
"""

from __future__ import annotations

from pathlib import Path

import typer

from brainshift.cli.app import choice, cli_errors


@cli_errors
def simulate_command(
    out: Path = typer.Option(..., "--out", "-o", help="Dataset folder to write (subjects/, cases/, dataset.json)."),
    demo: bool = typer.Option(False, "--demo", help="Simulate a synthetic subject made from the MNI152 template."),
    image: Path | None = typer.Option(None, "--image", help="Real input: preop image (NIfTI, NRRD, MetaImage)."),
    brain_mask: Path | None = typer.Option(None, "--brain-mask",
                                           help="Real input: brain mask (nonzero = inside; negative values are "
                                                "refused)."),
    tumour: Path | None = typer.Option(None, "--tumour", help="Real input: tumour mask or BraTS-style label map."),
    ventricles: Path | None = typer.Option(None, "--ventricles", help="Real input: ventricle mask or label map."),
    tumour_labels: str | None = typer.Option(None, "--tumour-labels",
                                             help="Labels of --tumour that are tumour, e.g. '1,4' (default: all)."),
    ventricle_labels: str | None = typer.Option(None, "--ventricle-labels",
                                                help="Labels of --ventricles that are ventricles, e.g. '4,43'."),
    seed: int = typer.Option(0, "--seed", min=0, help="Seed: the subject (demo) and the case's random draws."),
    resolution: float | None = typer.Option(None, "--resolution", help="Element size in mm (default 3)."),
    material: str | None = typer.Option(None, "--material", help="linear (default) or neo-hookean."),
    config: Path | None = typer.Option(None, "--config", help="Simulation config file (YAML or JSON)."),
    vtu: bool = typer.Option(False, "--vtu", help="Also write the mesh with its displacement as mesh.vtu."),
) -> None:
    """Simulate one brain-shift case (biomechanical FEM) and write it in the dataset layout.

    Writes OUT/subjects/<id>/, OUT/cases/<id>_c00/ (field.npz, cavity_mask.nii.gz, intraop_t1.nii.gz, meta.json,
    displacement_magnitude.png and, with --vtu, mesh.vtu), OUT/dataset.json and OUT/summary.json, all or nothing
    (as infer's outputs). With --demo the subject and case are those of
    `simulate-batch --subjects 1 --cases-per-subject 1` with the same --seed.
    """
    import time

    from brainshift.errors import BrainshiftError
    from brainshift.io.output_set import OutputSet
    from brainshift.simulate import batch
    from brainshift.simulate.case import draw_case_parameters, simulate_case
    from brainshift.simulate.dataset import case_intraop_image

    real = [image, brain_mask, tumour]
    if demo == any(p is not None for p in real) or (not demo and any(p is None for p in real)):
        raise BrainshiftError("expected either --demo or all of --image, --brain-mask and --tumour, got "
                              + ("both" if demo else "an incomplete real input"))
    sim_cfg, synth_cfg = batch.read_config_file(config, resolution=resolution, material=choice(material))
    if demo:
        entries = batch.normalise_subjects(1, seed)
    else:
        spec = {"image": str(image), "brain_mask": str(brain_mask), "tumour": str(tumour)}
        if ventricles is not None:
            spec["ventricles"] = str(ventricles)
        if tumour_labels:
            spec["tumour_labels"] = _labels(tumour_labels, "--tumour-labels")
        if ventricle_labels:
            spec["ventricle_labels"] = _labels(ventricle_labels, "--ventricle-labels")
        spec["subject_id"] = _stem(image)
        entries = batch.normalise_subjects([spec], seed)
    entry = entries[0]
    out = Path(out)
    sid = entry["subject_id"]
    cid = batch.case_id(sid, 0)
    # a user's file at one of the output names is refused before the simulation (minutes); the commit checks again
    planned = _simulate_outputs(sid, cid, vtu=vtu)
    OutputSet(out, planned)

    t0 = time.perf_counter()
    if demo:
        from brainshift.simulate.subject import synthesize_subject

        typer.echo(f"synthesising subject {sid} from the MNI152 template (seed {entry['seed']})")
        subject = synthesize_subject(entry["seed"], config=synth_cfg, subject_id=sid)
    else:
        from brainshift.simulate.subject import load_subject

        s = entry["spec"]
        subject = load_subject(s["image"], s["brain_mask"], s["tumour"], ventricles_path=s.get("ventricles"),
                               tumour_labels=s.get("tumour_labels"), ventricle_labels=s.get("ventricle_labels"),
                               subject_id=sid)
    cseed = batch.case_seed(seed, entry["index"], 0)
    params = draw_case_parameters(subject, sim_cfg, cseed)
    result = simulate_case(subject, sim_cfg, params, progress=True)
    meta = {**result.meta, "batch_seed": int(seed), "subject_index": entry["index"], "case_index": 0,
            "case_seed": cseed, "wall_s": time.perf_counter() - t0}
    intraop = case_intraop_image(subject, result.field_vox, result.cavity_mask, cseed)
    with OutputSet(out, planned) as outputs:
        _write_simulated_case(outputs, subject, cid, result, meta, intraop, sim_cfg, vtu=vtu)

        def dataset_json(path: Path) -> None:  # its counts are those of the staged case
            record = batch.start_dataset(path.parent, entries, cases_per_subject=1, config=sim_cfg, seed=seed,
                                         synthesis=synth_cfg)
            batch.finish_dataset(path.parent, record, simulated=1, failed=0)

        outputs.write(batch.DATASET_JSON, dataset_json)
        outputs.commit({"command": "brainshift simulate", "seed": int(seed), "subject": sid, "case": cid})
    typer.echo(f"case {cid}: max displacement {result.meta['max_displacement_mm']:.2f} mm, median "
               f"{result.meta['median_displacement_mm']:.2f} mm ({time.perf_counter() - t0:.1f} s); wrote "
               f"{out / 'cases' / cid} and {_PNG}" + (" and mesh.vtu" if vtu else ""))


_PNG = "displacement_magnitude.png"


def _simulate_outputs(subject_id: str, case_id: str, *, vtu: bool) -> list[str]:
    """The files ``simulate`` writes, as paths relative to ``--out`` (summary.json aside)."""
    from brainshift.simulate.batch import DATASET_JSON
    from brainshift.simulate.dataset import INTRAOP_FILE, SUBJECT_FILES

    subject = [f"subjects/{subject_id}/{name}" for name in [*SUBJECT_FILES.values(), "subject.json"]]
    case = [f"cases/{case_id}/{name}" for name in ["field.npz", "cavity_mask.nii.gz", INTRAOP_FILE, "meta.json",
                                                   _PNG, *(["mesh.vtu"] if vtu else [])]]
    return [*subject, *case, DATASET_JSON]


def _write_simulated_case(outputs, subject, case_id: str, result, meta: dict, intraop, sim_cfg, *, vtu: bool) -> None:
    """Stage the subject and case folders in ``outputs`` (an open :class:`~brainshift.io.output_set.OutputSet`),
    each folder's marker last (``subject.json``, then ``meta.json``: a case is complete only once it exists)."""
    from brainshift.simulate.dataset import case_writers, subject_writers
    from brainshift.simulate.preview import save_displacement_png

    for name, writer in subject_writers(subject):
        outputs.write(f"subjects/{subject.subject_id}/{name}", writer)
    case = f"cases/{case_id}"
    outputs.write(f"{case}/{_PNG}", lambda p: save_displacement_png(
        subject.image, result.field_vox, p, cavity=result.cavity_mask, brain=subject.brain_mask,
        title=f"{case_id}: {sim_cfg.material}, {sim_cfg.resolution_mm:g} mm elements"))
    if vtu:
        from brainshift.simulate.export import export_vtu

        outputs.write(f"{case}/mesh.vtu", lambda p: export_vtu(result, p))
    for name, writer in case_writers(case_id, subject.subject_id, result.field_vox, subject.image.affine,
                                     result.cavity_mask, meta, intraop=intraop):
        outputs.write(f"{case}/{name}", writer)


@cli_errors
def simulate_batch_command(
    subjects: str = typer.Option(..., "--subjects", help="Number of synthetic subjects; a part START:STOP of them "
                                 "(the subjects sSTART..s(STOP-1) of a batch of STOP, same seeds: make a batch in "
                                 "parts); or a CSV file with columns "
                                 "image,brain_mask,tumour[,ventricles,subject_id,tumour_labels,ventricle_labels]."),
    cases_per_subject: int = typer.Option(..., "--cases-per-subject", help="Cases simulated per subject."),
    out: Path = typer.Option(..., "--out", "-o", help="Dataset folder (resumed if it exists)."),
    config: Path | None = typer.Option(None, "--config", help="Simulation config file (YAML or JSON)."),
    scheduler_address: str | None = typer.Option(None, "--scheduler-address",
                                                 help="Existing Dask scheduler, e.g. tcp://host:8786."),
    workers: int | None = typer.Option(None, "--workers", help="LocalCluster workers (default: CPU cores)."),
    seed: int = typer.Option(0, "--seed", min=0, help="Batch seed (subject and case seeds derive from it)."),
    resolution: float | None = typer.Option(None, "--resolution", help="Element size in mm (default 3)."),
    material: str | None = typer.Option(None, "--material", help="linear (default) or neo-hookean."),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Show a progress bar."),
    keypoints: bool = typer.Option(True, "--keypoints/--no-keypoints",
                                   help="Detect each subject's keypoints into subjects/<id>/keypoints.csv "
                                        "(training and evaluation draw keypoints among them)."),
    intraop: bool = typer.Option(True, "--intraop/--no-intraop",
                                 help="Write each case's synthetic intraop MRI (intraop_t1.nii.gz; 1-3 min per "
                                      "case on a small CPU; training sets do not need it)."),
) -> None:
    """Simulate many cases as Dask tasks into a dataset folder (resumable; failures logged, not fatal).

    Exit code 1 if any case failed (see OUT/failures.log), 2 for bad input.
    """
    from brainshift.errors import BrainshiftError
    from brainshift.simulate.batch import read_config_file, read_subjects_csv, simulate_batch

    sim_cfg, synth_cfg = read_config_file(config, resolution=resolution, material=choice(material))
    text = subjects.strip()
    part = text.split(":")
    if text.isdigit():
        subject_arg: int | list | range = int(text)
    elif len(part) == 2 and all(p.strip().isdigit() for p in part):
        start, stop = (int(p) for p in part)
        if start >= stop:
            raise BrainshiftError(f"expected --subjects START:STOP with START < STOP, got {subjects!r}")
        subject_arg = range(start, stop)
    elif text.lower().endswith(".csv"):
        subject_arg = read_subjects_csv(text)
    else:
        raise BrainshiftError(f"expected --subjects as a number, a part START:STOP or a .csv file, got {subjects!r}")
    report = simulate_batch(out, subjects=subject_arg, cases_per_subject=cases_per_subject, config=sim_cfg, seed=seed,
                            scheduler_address=scheduler_address, n_workers=workers, progress=progress,
                            synthesis=synth_cfg, keypoints=keypoints, intraop=intraop)
    typer.echo(report.summary())
    if report.failed:
        raise typer.Exit(code=1)


def _labels(text: str, option: str) -> list[int]:
    from brainshift.errors import BrainshiftError

    try:
        return [int(v) for v in text.replace(";", ",").replace(" ", ",").split(",") if v.strip()]
    except ValueError:
        raise BrainshiftError(f"expected integer labels separated by commas for {option}, got {text!r}") from None


def _stem(path: Path) -> str:
    from brainshift.simulate.subject import subject_id_from_path

    return subject_id_from_path(path)
