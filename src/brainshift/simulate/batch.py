"""Batch generation of simulated cases with Dask: many subjects x many cases, resumable.

:func:`simulate_batch` makes (or reuses) the subjects, then runs every case as a Dask task, on a
``distributed.LocalCluster`` (one single-threaded worker process per core; Dask sets ``OMP_NUM_THREADS=1``
and friends in its workers so BLAS does not oversubscribe) or on an existing cluster given by its scheduler
address (``tcp://host:8786``; start one with ``dask scheduler`` and ``dask worker tcp://host:8786
--nthreads 1`` on each machine, all sharing ``out_dir`` on a common file system).

Layout: :mod:`brainshift.simulate.dataset` (subjects ``sNNNN``, cases ``sNNNN_cMM``) plus, at the top,
``dataset.json`` (configuration, seeds, subjects, counts) and ``failures.log`` (the traceback of every failed
case, appended). A case is complete once its ``meta.json`` exists; complete cases are skipped, so an
interrupted run resumes where it stopped, and a run with more subjects or more cases per subject extends a
dataset. A resumed run must use the same seed and configurations (checked against ``dataset.json``).

Keypoint candidates: with ``keypoints=True`` (the default) every subject also gets
``subjects/<id>/keypoints.csv``: 3-D DoG keypoints (:func:`brainshift.keypoints.detect_keypoints`, default
parameters, as ``brainshift keypoints``) detected in its preop image inside brain minus tumour, the region the
demo and inference draw from. Training (:mod:`brainshift.train.data`) and evaluation
(:mod:`brainshift.evaluate.run`) then draw driving keypoints and held-out TRE targets among these detected
points, as the published pipeline did with 3D SIFT-Rank, instead of among random voxels. A resumed run adds
the file to subjects that lack it.

Seeds (NumPy ``SeedSequence`` spawn keys, so each value depends only on the batch seed and the indices, not
on how many subjects or cases are requested or the order they run in):

- synthetic subject ``i``: ``SeedSequence(seed, spawn_key=(0, i)).generate_state(1)[0]`` passed to
  :func:`~brainshift.simulate.subject.synthesize_subject`;
- case ``j`` of subject ``i``: ``SeedSequence(seed, spawn_key=(1, i, j)).generate_state(1)[0]`` passed to
  :func:`~brainshift.simulate.case.draw_case_parameters` (recorded in the case's ``meta.json``).
"""

from __future__ import annotations

import csv
import datetime as _dt
import functools
import logging
import os
import time
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from brainshift.errors import BrainshiftError, InputFileError

DATASET_JSON = "dataset.json"
FAILURES_LOG = "failures.log"
_SPEC_KEYS = {"image", "brain_mask", "tumour", "ventricles", "tumour_labels", "ventricle_labels", "subject_id"}


@dataclass
class BatchReport:
    """What :func:`simulate_batch` did.

    Attributes:
        out_dir: the dataset folder.
        n_subjects: subjects in the request.
        n_cases: cases in the request (subjects x cases per subject).
        simulated: ids of the cases simulated by this run.
        skipped: ids of the cases already complete (not simulated again).
        failed: case id -> one-line error, for the cases that failed (tracebacks in ``failures.log``).
        wall_s: wall time of the run (s).
    """

    out_dir: Path
    n_subjects: int
    n_cases: int
    simulated: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)
    wall_s: float = 0.0

    @property
    def ok(self) -> bool:
        """True when no case failed."""
        return not self.failed

    def summary(self) -> str:
        """A few lines for the terminal."""
        lines = [f"{self.n_cases} cases of {self.n_subjects} subjects in {self.out_dir}: {len(self.simulated)} "
                 f"simulated, {len(self.skipped)} already complete, {len(self.failed)} failed "
                 f"({self.wall_s:.1f} s)"]
        for cid, msg in sorted(self.failed.items()):
            lines.append(f"  failed {cid}: {msg}")
        if self.failed:
            lines.append(f"  tracebacks in {Path(self.out_dir) / FAILURES_LOG}")
        return "\n".join(lines)


def subject_seed(seed: int, index: int) -> int:
    """Seed of synthetic subject ``index`` of a batch with ``seed`` (see the module docstring)."""
    return int(np.random.SeedSequence(int(seed), spawn_key=(0, int(index))).generate_state(1)[0])


def case_seed(seed: int, subject_index: int, case_index: int) -> int:
    """Seed of case ``case_index`` of subject ``subject_index`` (see the module docstring)."""
    return int(np.random.SeedSequence(int(seed), spawn_key=(1, int(subject_index), int(case_index)))
               .generate_state(1)[0])


def case_id(subject_id: str, case_index: int) -> str:
    """Case id ``<subject_id>_cNN`` (e.g. ``s0007_c02``)."""
    return f"{subject_id}_c{case_index:02d}"


def read_subjects_csv(path: str | Path) -> list[dict]:
    """Real-subject specs from a CSV file.

    Columns: ``image``, ``brain_mask``, ``tumour`` (required), ``ventricles``, ``subject_id``,
    ``tumour_labels`` and ``ventricle_labels`` (optional; labels as integers separated by spaces or ``;``).
    Relative paths are relative to the CSV file's folder; empty cells mean "not given".

    Raises:
        InputFileError: missing file, missing required column, unknown column, bad label list or no rows.
    """
    p = Path(path)
    if not p.is_file():
        raise InputFileError(f"expected a subjects CSV file, got {str(p)!r} (not found)")
    with open(p, newline="") as fh:
        reader = csv.DictReader(fh)
        cols = [c.strip() for c in (reader.fieldnames or [])]
        missing = {"image", "brain_mask", "tumour"} - set(cols)
        unknown = set(cols) - _SPEC_KEYS
        if missing or unknown:
            raise InputFileError(f"expected CSV columns image,brain_mask,tumour[,ventricles,subject_id,tumour_labels,"
                                 f"ventricle_labels], got {cols} in {p}")
        specs = []
        for row in reader:
            row = {k.strip(): (v or "").strip() for k, v in row.items() if k is not None}
            spec: dict[str, Any] = {}
            for key, val in row.items():
                if not val:
                    continue
                if key in ("image", "brain_mask", "tumour", "ventricles"):
                    q = Path(val)
                    spec[key] = str(q if q.is_absolute() else p.parent / q)
                elif key in ("tumour_labels", "ventricle_labels"):
                    try:
                        spec[key] = [int(x) for x in val.replace(";", " ").split()]
                    except ValueError:
                        raise InputFileError(f"expected integer labels in column {key}, got {val!r} in {p}") from None
                else:
                    spec[key] = val
            specs.append(spec)
    if not specs:
        raise InputFileError(f"expected at least one subject row in {p}, got none")
    return specs


def normalise_subjects(subjects, seed: int) -> list[dict]:
    """The subjects of a batch as JSON-serialisable entries (recorded in ``dataset.json``).

    Args:
        subjects: a number of synthetic subjects, a ``range`` of them (``range(30, 60)``: subjects ``s0030`` ...
            ``s0059``, the same ids and seeds as in a request of 60 subjects, so a batch can be made in parts on
            several machines or days and its folders merged), or a list of real-subject spec dicts (keys ``image``,
            ``brain_mask``, ``tumour`` [, ``ventricles``, ``tumour_labels``, ``ventricle_labels``,
            ``subject_id``]) or subject folders in the dataset layout.
        seed: the batch seed (synthetic subjects' seeds derive from it).

    Returns:
        One dict per subject: ``index``, ``subject_id`` (``sNNNN`` unless the spec names it), ``kind``
        (``"synthetic"``, ``"file"`` or ``"folder"``) and ``seed``, ``spec`` or ``path`` respectively.

    Raises:
        BrainshiftError: no subjects, an empty or stepped range, unknown or missing spec keys, duplicate ids.
        InputFileError: a subject folder without ``subject.json``.
    """
    if isinstance(subjects, range):
        if subjects.step != 1 or subjects.start < 0 or len(subjects) < 1:
            raise BrainshiftError(f"expected a range of synthetic subjects START:STOP with 0 <= START < STOP, got "
                                  f"{subjects.start}:{subjects.stop}")
        return [{"index": i, "subject_id": f"s{i:04d}", "kind": "synthetic", "seed": subject_seed(seed, i)}
                for i in subjects]
    if isinstance(subjects, (int, np.integer)) and not isinstance(subjects, bool):
        if subjects < 1:
            raise BrainshiftError(f"expected at least 1 subject, got {subjects}")
        return [{"index": i, "subject_id": f"s{i:04d}", "kind": "synthetic", "seed": subject_seed(seed, i)}
                for i in range(int(subjects))]
    if isinstance(subjects, (str, Path)):
        raise BrainshiftError("expected subjects as an int or a list of specs (use read_subjects_csv for a CSV "
                              f"file), got {subjects!r}")
    out = []
    for i, spec in enumerate(list(subjects)):
        if isinstance(spec, dict):
            unknown = set(spec) - _SPEC_KEYS
            missing = {"image", "brain_mask", "tumour"} - set(spec)
            if unknown or missing:
                raise BrainshiftError(f"expected subject spec keys image, brain_mask, tumour[, ventricles, "
                                      f"tumour_labels, ventricle_labels, subject_id], got {sorted(spec)}")
            sid = str(spec.get("subject_id") or f"s{i:04d}")
            out.append({"index": i, "subject_id": sid, "kind": "file",
                        "spec": {k: (str(v) if isinstance(v, Path) else v) for k, v in spec.items()}})
        elif isinstance(spec, (str, Path)):
            folder = Path(spec)
            if not (folder / "subject.json").is_file():
                raise InputFileError(f"expected a subject folder with subject.json, got {str(folder)!r}")
            out.append({"index": i, "subject_id": folder.name, "kind": "folder", "path": str(folder)})
        else:
            raise BrainshiftError(f"expected a subject spec dict or a subject folder path, got {type(spec).__name__}")
    ids = [e["subject_id"] for e in out]
    if len(set(ids)) != len(ids):
        raise BrainshiftError(f"expected unique subject ids, got duplicates in {ids}")
    if not out:
        raise BrainshiftError("expected at least one subject, got an empty list")
    return out


# ------------------------------------------------------------------------------------------- Dask tasks


def _make_subject(out_dir: str, entry: dict, synthesis: dict | None, keypoints: bool = False) -> dict:
    """Task: make and write one subject unless it exists (and its keypoints file if asked and missing).

    Returns a status dict (never raises).
    """
    from brainshift.simulate.dataset import read_subject, write_subject

    sid = entry["subject_id"]
    try:
        if (Path(out_dir) / "subjects" / sid / "subject.json").is_file():
            if keypoints:
                _write_subject_keypoints(out_dir, sid)
            return {"subject_id": sid, "status": "ok", "made": False}
        t0 = time.perf_counter()
        if entry["kind"] == "synthetic":
            from brainshift.simulate.subject import SynthesisConfig, synthesize_subject

            cfg = SynthesisConfig.from_dict(synthesis) if synthesis else SynthesisConfig()
            subject = synthesize_subject(entry["seed"], config=cfg, subject_id=sid)
        elif entry["kind"] == "file":
            from brainshift.simulate.subject import load_subject

            spec = entry["spec"]
            subject = load_subject(spec["image"], spec["brain_mask"], spec["tumour"],
                                   ventricles_path=spec.get("ventricles"), tumour_labels=spec.get("tumour_labels"),
                                   ventricle_labels=spec.get("ventricle_labels"), subject_id=sid)
        else:
            folder = Path(entry["path"])
            subject = read_subject(folder.parent.parent, folder.name)
        write_subject(out_dir, subject)
        if keypoints:
            _write_subject_keypoints(out_dir, sid)
        return {"subject_id": sid, "status": "ok", "made": True, "time_s": time.perf_counter() - t0}
    except Exception as exc:
        return {"subject_id": sid, "status": "failed", "error": f"{type(exc).__name__}: {exc}",
                "traceback": traceback.format_exc()}


def subject_keypoints_path(out_dir: str | Path, subject_id: str) -> Path:
    """``out_dir/subjects/<subject_id>/keypoints.csv``: the subject's detected keypoint candidates."""
    return Path(out_dir) / "subjects" / subject_id / "keypoints.csv"


def _write_subject_keypoints(out_dir: str | Path, subject_id: str) -> Path:
    """Detect keypoints of a written subject inside brain minus tumour; write ``keypoints.csv`` unless present.

    Columns ``x,y,z,scale_mm,response``, 0-based voxel indices of the subject grid (``brainshift keypoints``
    output, read by :func:`brainshift.simulate.dataset.read_subject_keypoints`). Written atomically.
    """
    from brainshift.io.keypoints import write_detected_keypoints
    from brainshift.keypoints.detect import detect_keypoints
    from brainshift.simulate.dataset import read_subject

    path = subject_keypoints_path(out_dir, subject_id)
    if path.is_file():
        return path
    subject = read_subject(out_dir, subject_id)
    allowed = (subject.brain_mask.data > 0) & ~(subject.tumour_mask.data > 0)
    return write_detected_keypoints(path, detect_keypoints(subject.image, allowed))


@functools.lru_cache(maxsize=2)
def _cached_subject(out_dir: str, subject_id: str, mtime: float):
    from brainshift.simulate.dataset import read_subject

    return read_subject(out_dir, subject_id)


def _run_case(out_dir: str, subject_status: dict, cid: str, seed: int, config, extra_meta: dict,
              intraop: bool = True) -> dict:
    """Task: simulate and write one case (with its synthetic intraop MRI when ``intraop``). Returns a status
    dict (never raises)."""
    from brainshift.simulate import case as case_mod
    from brainshift.simulate.dataset import case_intraop_image, write_case

    sid = subject_status["subject_id"]
    t0 = time.perf_counter()
    try:
        if subject_status["status"] != "ok":
            raise BrainshiftError(f"expected subject {sid} to be made, got: {subject_status['error']}")
        mtime = (Path(out_dir) / "subjects" / sid / "subject.json").stat().st_mtime
        subject = _cached_subject(out_dir, sid, mtime)
        params = case_mod.draw_case_parameters(subject, config, seed)
        result = case_mod.simulate_case(subject, config, params)
        meta = {**result.meta, **extra_meta, "case_seed": int(seed), "wall_s": time.perf_counter() - t0}
        image = case_intraop_image(subject, result.field_vox, result.cavity_mask, seed) if intraop else None
        meta["wall_s"] = time.perf_counter() - t0
        write_case(out_dir, cid, sid, result.field_vox, subject.image.affine, result.cavity_mask, meta,
                   intraop=image)
        return {"case_id": cid, "status": "ok", "time_s": time.perf_counter() - t0,
                "max_displacement_mm": float(result.meta.get("max_displacement_mm", float("nan")))}
    except Exception as exc:
        tb = subject_status.get("traceback", "") if subject_status["status"] != "ok" else ""
        return {"case_id": cid, "status": "failed", "error": f"{type(exc).__name__}: {exc}",
                "traceback": tb + traceback.format_exc(), "time_s": time.perf_counter() - t0}


# --------------------------------------------------------------------------------------------- the batch


def default_workers() -> int:
    """The CPU cores this process may use (the default number of LocalCluster workers)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - not Linux
        return max(1, os.cpu_count() or 1)


def _config_dict(config) -> dict:
    return config.to_dict() if hasattr(config, "to_dict") else asdict(config)


def _with_new_defaults(old, new, key: str):
    """``old`` (a configuration as an earlier version stored it) with the fields it lacks filled with their
    defaults, so that a dataset resumes after a version that added a field with a default that keeps the old
    behaviour (a field the new request sets to anything else still differs)."""
    import json

    if not (isinstance(old, dict) and isinstance(new, dict)):
        return old
    if key == "simulation_config":
        from brainshift.simulate.case import SimulationConfig

        defaults = SimulationConfig().to_dict()
    elif key == "synthesis_config":
        from brainshift.simulate.subject import SynthesisConfig

        defaults = asdict(SynthesisConfig())
    else:
        return old
    defaults = json.loads(json.dumps(defaults, default=str))
    return {**{k: defaults[k] for k in new if k not in old and k in defaults}, **old}


def _check_resume(path: Path, record: dict) -> dict:
    """Compare the request with an existing ``dataset.json``; return the merged subjects table."""
    import json

    try:
        old = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise InputFileError(f"expected a readable {path} from the earlier run, got: {exc}") from None
    new = json.loads(json.dumps(record, default=str))  # compare as stored (tuples become lists)
    for key in ("seed", "simulation_config", "synthesis_config"):
        if _with_new_defaults(old.get(key), new[key], key) != new[key]:
            raise BrainshiftError(f"expected the same {key} as the existing dataset in {path.parent} to resume it, "
                                  f"got a different one (old {old.get(key)!r} vs new {record[key]!r}); use a new "
                                  f"output folder for a different configuration")
    subjects = {s["subject_id"]: s for s in old.get("subjects", [])}
    for s in new["subjects"]:
        prev = subjects.get(s["subject_id"])
        if prev is not None and prev != s:
            raise BrainshiftError(f"expected subject {s['subject_id']} to be the same as in {path}, got {s} vs {prev}")
        subjects[s["subject_id"]] = s
    return {"subjects": list(subjects.values()), "cases_per_subject": max(int(old.get("cases_per_subject", 0)),
                                                                          record["cases_per_subject"])}


def _write_dataset_json(path: Path, record: dict) -> None:
    import json

    from brainshift.io.atomic import atomic_output

    with atomic_output(path) as tmp:
        tmp.write_text(json.dumps(record, indent=2, sort_keys=True, default=str))


def _log_failure(out_dir: Path, status: dict) -> None:
    stamp = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    with open(out_dir / FAILURES_LOG, "a") as fh:
        fh.write(f"=== {stamp} case {status['case_id']} failed: {status['error']}\n{status.get('traceback', '')}\n")


#: Dask settings of the LocalCluster's workers. distributed's nanny exports ``MALLOC_TRIM_THRESHOLD_=65536`` to
#: every worker it spawns (to return freed memory to the OS); setting any glibc malloc threshold switches off
#: glibc's dynamic mmap threshold, so every array above 128 kB is then mmap'ed, page-faulted and zeroed anew
#: on each allocation. The simulator's CG / AMG loops allocate many such temporaries: measured on the 2-core
#: machine, one case took 24.4 s with the variable against 19.6 s without in a plain process, and 28.7 s
#: against 22.0 s inside the workers (bench/RESULTS.md). ``None`` removes the variable (distributed's own
#: convention); the other pre-spawn variables (one BLAS / OpenMP thread per worker) are kept.
LOCAL_WORKER_CONFIG = {"distributed.nanny.pre-spawn-environ.MALLOC_TRIM_THRESHOLD_": None}


def simulate_batch(out_dir: str | Path, *, subjects: list[str | dict] | int | range, cases_per_subject: int, config,
                   seed: int, scheduler_address: str | None = None, n_workers: int | None = None,
                   progress: bool = True, synthesis=None, processes: bool = True,
                   keypoints: bool = True, intraop: bool = True) -> BatchReport:
    """Simulate ``cases_per_subject`` cases for each subject as Dask tasks, into the dataset layout.

    Args:
        out_dir: dataset folder (created; an existing one is resumed).
        subjects: number of synthetic subjects (``s0000`` ...), a ``range`` of them (a part of a larger batch:
            :func:`normalise_subjects`), or a list of real-subject specs: dicts with
            ``image``, ``brain_mask``, ``tumour`` [, ``ventricles``, ``tumour_labels``, ``ventricle_labels``,
            ``subject_id``] (e.g. from :func:`read_subjects_csv`), or paths of existing subject folders.
        cases_per_subject: cases per subject (ids ``<subject>_c00`` ...).
        config: :class:`~brainshift.simulate.case.SimulationConfig` of every case.
        seed: batch seed; subject and case seeds derive from it (module docstring).
        scheduler_address: address of an existing Dask scheduler (``tcp://host:8786``); default: start a
            ``LocalCluster``.
        n_workers: LocalCluster workers (default: the CPU cores available), one thread each.
        progress: show a tqdm progress bar over the cases.
        synthesis: :class:`~brainshift.simulate.subject.SynthesisConfig` for synthetic subjects (default one).
        processes: LocalCluster workers are processes (default) or threads of this process.
        keypoints: detect every subject's keypoint candidates into ``subjects/<id>/keypoints.csv`` (module
            docstring); subjects that lack the file get it on a resumed run.
        intraop: write every case's synthetic intraop MRI (``intraop_t1.nii.gz``, 1-3 min per case on a
            2-core CPU); training sets do not need it (``--no-intraop``).

    Returns:
        :class:`BatchReport`. Failed cases do not stop the others: each is listed there and its traceback
        appended to ``out_dir/failures.log``.

    Raises:
        BrainshiftError: bad subjects / counts, or ``out_dir`` holds a dataset made with another seed or
            configuration.
    """
    import dask
    from distributed import Client, LocalCluster, as_completed
    from tqdm.auto import tqdm

    from brainshift.simulate.dataset import list_cases

    t_start = time.perf_counter()
    if int(cases_per_subject) < 1:
        raise BrainshiftError(f"expected cases_per_subject >= 1, got {cases_per_subject}")
    if n_workers is not None and int(n_workers) < 1:
        raise BrainshiftError(f"expected at least 1 worker, got {n_workers}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    entries = normalise_subjects(subjects, seed)
    record = start_dataset(out, entries, cases_per_subject=cases_per_subject, config=config, seed=seed,
                           synthesis=synthesis)
    synth_dict = record["synthesis_config"]

    done = set(list_cases(out))
    plan = [(e, j, case_id(e["subject_id"], j)) for e in entries for j in range(int(cases_per_subject))]
    report = BatchReport(out_dir=out, n_subjects=len(entries), n_cases=len(plan))
    report.skipped = [cid for _, _, cid in plan if cid in done]
    todo = [(e, j, cid) for e, j, cid in plan if cid not in done]
    need_subject = {e["subject_id"]: e for e, _, _ in todo}
    if keypoints:
        need_subject.update({e["subject_id"]: e for e in entries
                             if not subject_keypoints_path(out, e["subject_id"]).is_file()})

    if need_subject:
        if scheduler_address:
            cluster = None
            client = Client(scheduler_address)
        else:
            with dask.config.set(LOCAL_WORKER_CONFIG):
                cluster = LocalCluster(n_workers=n_workers or default_workers(), threads_per_worker=1,
                                       processes=processes, dashboard_address=None, silence_logs=logging.ERROR)
            client = Client(cluster)
        try:
            subject_futures = {}
            for e in need_subject.values():
                subject_futures[e["subject_id"]] = client.submit(_make_subject, str(out), e, synth_dict, keypoints,
                                                                 pure=False,
                                                                 key=f"subject-{e['subject_id']}-{time.time_ns()}")
            futures = []
            for e, j, cid in todo:
                extra = {"batch_seed": int(seed), "subject_index": e["index"], "case_index": j}
                futures.append(client.submit(_run_case, str(out), subject_futures[e["subject_id"]], cid,
                                             case_seed(seed, e["index"], j), config, extra, intraop, pure=False,
                                             key=f"case-{cid}-{time.time_ns()}"))
            cid_of = {f.key: cid for f, (_, _, cid) in zip(futures, todo, strict=True)}
            bar = tqdm(total=len(futures), desc="cases", unit="case", disable=not progress)
            for fut in as_completed(futures):
                try:
                    status = fut.result()
                except Exception as exc:  # the worker died (KilledWorker, lost connection...)
                    status = {"case_id": cid_of[fut.key], "status": "failed",
                              "error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()}
                if status["status"] == "ok":
                    report.simulated.append(status["case_id"])
                else:
                    report.failed[status["case_id"]] = status["error"].splitlines()[0] if status["error"] else "?"
                    _log_failure(out, status)
                bar.update(1)
                bar.set_postfix(failed=len(report.failed))
                fut.release()
            bar.close()
            # subjects made only for their keypoints (no case of theirs left to run): wait for them here
            for sid, fut in subject_futures.items():
                status = fut.result()
                if status["status"] != "ok" and not any(cid.startswith(f"{sid}_") for _, _, cid in todo):
                    report.failed[f"{sid} (subject)"] = status["error"].splitlines()[0]
                    _log_failure(out, {**status, "case_id": f"{sid} (subject)"})
        finally:
            client.close()
            if cluster is not None:
                cluster.close()

    report.simulated.sort()
    report.wall_s = time.perf_counter() - t_start
    finish_dataset(out, record, simulated=len(report.simulated), failed=len(report.failed))
    return report


def start_dataset(out: Path, entries: list[dict], *, cases_per_subject: int, config, seed: int,
                  synthesis=None) -> dict:
    """Write (or check and update, on resume) ``out/dataset.json`` before any case runs; return the record.

    Raises:
        BrainshiftError: an existing ``dataset.json`` has another seed, simulation or synthesis configuration,
            or another definition of one of the subjects.
    """
    from brainshift import __version__
    from brainshift.simulate.dataset import list_cases

    synth_dict = None
    if any(e["kind"] == "synthetic" for e in entries):
        from brainshift.simulate.subject import SynthesisConfig

        synth_dict = asdict(synthesis if synthesis is not None else SynthesisConfig())
        synth_dict = {k: list(v) if isinstance(v, tuple) else v for k, v in synth_dict.items()}
    record: dict[str, Any] = {
        "format": "brainshift-simulated-dataset", "version": 1, "brainshift_version": __version__,
        "seed": int(seed), "simulation_config": _config_dict(config), "synthesis_config": synth_dict,
        "cases_per_subject": int(cases_per_subject), "subjects": entries,
    }
    ds_path = Path(out) / DATASET_JSON
    if ds_path.exists():
        record.update(_check_resume(ds_path, record))
    record["counts"] = {"subjects": len(record["subjects"]), "cases_complete": len(list_cases(out))}
    record["updated"] = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    _write_dataset_json(ds_path, record)
    return record


def finish_dataset(out: Path, record: dict, *, simulated: int, failed: int) -> None:
    """Rewrite ``out/dataset.json`` with the final counts."""
    from brainshift.simulate.dataset import list_cases

    record["counts"] = {"subjects": len(record["subjects"]), "cases_complete": len(list_cases(out)),
                        "cases_failed_last_run": failed, "cases_simulated_last_run": simulated}
    record["updated"] = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    _write_dataset_json(Path(out) / DATASET_JSON, record)


def read_config_file(path: Path | None, *, resolution: float | None = None, material: str | None = None):
    """Simulation and synthesis configs from a YAML / JSON file, with command-line overrides.

    The file holds either the :class:`~brainshift.simulate.case.SimulationConfig` fields at the top level, or
    sections ``simulation:`` and ``synthesis:`` (the latter :class:`~brainshift.simulate.subject.SynthesisConfig`
    fields). ``resolution`` and ``material`` override the file when given (also the model family's draws of
    them, when the file has a ``family``).

    Returns:
        ``(SimulationConfig, SynthesisConfig)``.

    Raises:
        InputFileError: missing or unparsable file, or not a mapping.
        BrainshiftError: unknown or invalid configuration values.
    """
    from brainshift.errors import InputFileError
    from brainshift.simulate.case import SimulationConfig
    from brainshift.simulate.subject import SynthesisConfig

    data: dict = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise InputFileError(f"expected a config file (YAML or JSON), got {str(p)!r} "
                                 f"({'a directory' if p.is_dir() else 'not found'})")
        try:
            text = p.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            raise InputFileError(f"expected a UTF-8 text config file (YAML or JSON), got {str(p)!r}, which is not "
                                 f"UTF-8 text") from None
        try:
            if p.suffix.lower() == ".json":
                import json

                data = json.loads(text)
            else:
                import yaml

                data = yaml.safe_load(text) or {}
        except ValueError as exc:
            raise InputFileError(f"expected a valid JSON config in {p}, got: {exc}") from None
        except Exception as exc:  # yaml.YAMLError
            raise InputFileError(f"expected a valid YAML config in {p}, got: {exc}") from None
        if not isinstance(data, dict):
            raise InputFileError(f"expected a mapping of config keys in {p}, got {type(data).__name__}")
    if set(data) & {"simulation", "synthesis"}:
        unknown = set(data) - {"simulation", "synthesis"}
        if unknown:
            raise InputFileError(f"expected only the sections simulation and synthesis, got also {sorted(unknown)}")
        for section in ("simulation", "synthesis"):
            if not isinstance(data.get(section) or {}, dict):
                raise InputFileError(f"expected the section {section}: of {path} to be a mapping of config keys, "
                                     f"got {data[section]!r}")
        sim, synth = dict(data.get("simulation") or {}), dict(data.get("synthesis") or {})
    else:
        sim, synth = dict(data), {}
    family = sim.get("family")
    if resolution is not None:
        sim["resolution_mm"] = float(resolution)
        if isinstance(family, dict):  # the family draws the element size per case: the override fixes it
            family["resolution_mm"] = {float(resolution): 1.0}
    if material is not None:
        sim["material"] = material
        if isinstance(family, dict):
            family["material"] = [material]
    return SimulationConfig.from_dict(sim), SynthesisConfig.from_dict(synth)
