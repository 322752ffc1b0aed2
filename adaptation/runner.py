"""Running one adaptation job in the background worker, from its stored cells to a registered lab model.

The job's cells are copied from the media storage into a private working folder (``<class>/<name>``), the
training cells adapt the base model (:func:`wbc_ml.adaptation.adapt_model`: methods and hyper-parameters chosen by
cross-validation on them only), then the base and the adapted model are both measured on the held-back cells as
the web app serves them (:func:`wbc_ml.evaluation.evaluate_on_samples`: the detectors counted in the flagged share).
Only then is the adapted model registered, the way an upload is (:func:`classifier.custom_models.
register_lab_model_file`). Every step stores the progress and looks at the cancel flag: a cancelled or failed job
leaves no model, no registered file, and no working folder behind.
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
from django.conf import settings
from django.core.files.storage import default_storage
from django.db import transaction
from django.utils import timezone

from classifier.custom_models import register_lab_model_file, remove_files
from reports.worker import stopping as worker_stopping
from wbc_ml import datasets
from wbc_ml.adaptation.progress import Cancelled, Progress
from wbc_ml.checksums import file_sha256
from wbc_ml.metrics import wilson
from wbc_ml.review_flag import DEFAULT_THRESHOLD

from .cells import HELD_BACK, NON_WBC, TRAIN
from .models import AdaptationJob

logger = logging.getLogger(__name__)

EVALUATION_UNITS = 2.0  # both models on the held-back cells, in wbc_ml.adaptation.progress units
REGISTRATION_UNITS = 2.0  # the vetting child and its ONNX copy
PROGRESS_EVERY_SECONDS = 1.0  # at most this often a progress row is written (a stage change is always written)
INTERRUPTED = "the worker was stopped while the job ran; nothing was registered: start the adaptation again"


class Interrupted(Cancelled):
    """The worker is shutting down: the job fails with :data:`INTERRUPTED` instead of running on past the stop."""


class JobProgress:
    """Stores a job's stage and share done (queryset updates: no audit row per step) and raises
    :class:`Cancelled` once someone asked the job to stop (:class:`Interrupted` once the worker is stopping)."""

    def __init__(self, job: AdaptationJob):
        self.job_id = job.pk
        self.last_write = 0.0
        self.last_stage = ""

    def __call__(self, stage: str, fraction: float) -> None:
        now = time.monotonic()
        if stage != self.last_stage or now - self.last_write >= PROGRESS_EVERY_SECONDS:
            AdaptationJob.objects.filter(pk=self.job_id).update(
                stage=stage[:200], progress=round(min(max(fraction, 0.0), 1.0), 4), updated_at=timezone.now()
            )
            self.last_write, self.last_stage = now, stage
        self.check()

    def check(self) -> None:
        if worker_stopping.is_set():  # SIGTERM: the job ends at its next step, registering nothing
            raise Interrupted(INTERRUPTED)
        if AdaptationJob.objects.filter(pk=self.job_id, cancel_requested=True).exists():
            raise Cancelled("cancelled by the lab")


def run_job(job_id: int) -> str:
    """Run a queued job to its end: ready (a registered lab model), cancelled, or failed with the reason."""
    job = _claim(job_id)
    if job is None:
        return "not queued"
    workdir = Path(tempfile.mkdtemp(prefix=f"wbc-adaptation-{job.pk}-"))
    try:
        outcome = _adapt(job, workdir)
    except Interrupted:
        _finish(job, AdaptationJob.Status.FAILED, stage="stopped; nothing was registered", error=INTERRUPTED)
        return "interrupted"
    except Cancelled:
        _finish(job, AdaptationJob.Status.CANCELLED, stage="cancelled; nothing was registered")
        return "cancelled"
    except Exception as exc:  # the job records why; the worker goes on with other tasks
        logger.exception("adaptation job %s failed", job.pk)
        _finish(job, AdaptationJob.Status.FAILED, stage="failed; nothing was registered", error=f"{exc}"[:2000])
        return "failed"
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    return outcome


def _claim(job_id: int) -> AdaptationJob | None:
    with transaction.atomic():
        job = AdaptationJob.objects.select_for_update().filter(pk=job_id).first()
        if job is None or job.status != AdaptationJob.Status.QUEUED:
            return None
        job.status, job.started_at, job.updated_at = AdaptationJob.Status.RUNNING, timezone.now(), timezone.now()
        job.stage = "reading the labelled cells"
        job._change_reason = "adaptation running"
        job.save(update_fields=["status", "started_at", "updated_at", "stage"])
    return job


def _finish(job: AdaptationJob, status: str, *, stage: str, error: str = "", **fields) -> None:
    job.refresh_from_db()
    job.status, job.stage, job.error, job.finished_at = status, stage, error, timezone.now()
    for name, value in fields.items():
        setattr(job, name, value)
    job._change_reason = f"adaptation {status}"
    job.save()


def _copy(image: str, target: Path) -> Path:
    """One stored image copied from the media storage (local or S3) into the working folder."""
    target.parent.mkdir(parents=True, exist_ok=True)
    with default_storage.open(image, "rb") as source, open(target, "wb") as out:
        shutil.copyfileobj(source, out)
    return target


def _samples(job: AdaptationJob, role: str, folder: Path) -> list[datasets.Sample]:
    """The job's cells of ``role`` as ``folder/<class>/<name>`` files (the names the card lists)."""
    index = {name: i for i, name in enumerate(job.base_model.class_names)}
    return [
        datasets.Sample(_copy(cell["image"], folder / cell["class"] / cell["name"]), index[cell["class"]])
        for cell in job.cells_with_role(role)
    ]


def _non_wbc_paths(job: AdaptationJob, folder: Path) -> list[Path]:
    """The lab's verified non-WBC cells, and the images of ``WBC_ADAPT_NON_WBC_DIR`` when it is set."""
    cells = job.cells_with_role(NON_WBC)
    paths = [_copy(cell["image"], folder / f"{i:05d}{Path(cell['image']).suffix}") for i, cell in enumerate(cells)]
    extra = Path(settings.WBC_ADAPT_NON_WBC_DIR) if settings.WBC_ADAPT_NON_WBC_DIR else None
    if extra is not None and extra.is_dir():
        paths += sorted(p for p in extra.rglob("*") if p.suffix.lower() in datasets.IMAGE_SUFFIXES)
    return paths


def base_card(record) -> dict:
    """What the adaptation needs to know of the base model, from its registry row (and its card where it has one)."""
    return {
        **(record.card or {}),
        "name": record.name,
        "architecture": record.architecture,
        "file": Path(record.file_name).name,
        "input_size": [record.input_height, record.input_width],
        "normalization": record.normalization,
        "class_names": list(record.class_names),
        "temperature": record.temperature,
    }


def _adapt(job: AdaptationJob, workdir: Path) -> str:
    from wbc_ml.adaptation import AdaptConfig, adapt_model  # TensorFlow: in the worker only
    from wbc_ml.evaluation import evaluate_on_samples

    reporter = JobProgress(job)
    progress = Progress(reporter)
    progress.plan(EVALUATION_UNITS + REGISTRATION_UNITS)
    base = job.base_model
    spec = base.spec()
    if file_sha256(base.path) != job.base_sha256:
        raise RuntimeError(f"{base} no longer matches the file the job was started with (sha256 differs)")
    if spec.ood_path is not None and file_sha256(spec.ood_path) != base.ood_sha256:
        raise RuntimeError(f"the detector file of {base} does not match its registered sha256")
    train = _samples(job, TRAIN, workdir / "train")
    held_back = _samples(job, HELD_BACK, workdir / "held_back")
    reporter.check()
    card_of_base = base_card(base)
    out = workdir / "out" / "adapted.keras"
    config = AdaptConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in job.config.items()})
    card = adapt_model(
        base.path,
        train,
        out,
        workdir / "train",
        config,
        command=f"adaptation job {job.uid} (web)",
        log=logger.info,
        base_card=card_of_base,
        non_wbc_paths=_non_wbc_paths(job, workdir / "non_wbc"),
        progress=progress,
        started_by=job.started_by.get_username(),
    )
    progress.at("measuring the base and the adapted model on the held-back cells")
    evaluation = {
        "threshold": DEFAULT_THRESHOLD,
        "base": _measured(evaluate_on_samples(base.path, card_of_base, spec.ood_path, held_back, DEFAULT_THRESHOLD)),
        "adapted": _measured(
            evaluate_on_samples(out, card, out.with_name(card["ood"]["file"]), held_back, DEFAULT_THRESHOLD)
        ),
    }
    evaluation["files"] = evaluation["adapted"].pop("files")
    evaluation["base"].pop("files")
    progress.advance("measured on the held-back cells", EVALUATION_UNITS)
    card["adaptation"]["job"] = {
        "uid": str(job.uid),
        "laboratory": job.laboratory.name,
        "started_by": job.started_by.get_username(),
        "sources": job.sources,
        "base_model_registry": {"name": base.name, "version": base.version, "sha256": base.sha256},
    }
    card["held_back"] = {"description": "cells kept out of adaptation and cross-validation", **evaluation}
    progress.at("registering the adapted model (checked like an upload, ONNX copy)")
    reporter.check()
    return _register(job, out, plain_json(card), plain_json(evaluation))


def plain_json(value):
    """``value`` as strict JSON (the database refuses NaN): non-finite numbers become null, NumPy values plain."""
    text = json.dumps(value, default=lambda v: v.item() if isinstance(v, np.generic) else str(v))
    return json.loads(text, parse_constant=lambda _constant: None)


def _measured(result: dict) -> dict:
    """The held-back metrics with a 95% (Wilson) interval for the accuracy."""
    correct = round(result["accuracy"] * result["n"])
    return {**result, "accuracy_95ci": wilson(correct, result["n"])}


def _register(job: AdaptationJob, out: Path, card: dict, evaluation: dict) -> str:
    """Register the model and mark the job ready in one transaction: a cancel that came first wins, and then (as on
    any failure) the row is rolled back and the files removed."""
    base = job.base_model
    record = None
    try:
        with transaction.atomic():
            record = register_lab_model_file(
                job.started_by,
                out,
                name=f"{base.name} · adapted for {job.laboratory.name}"[:120],
                class_names=list(card["class_names"]),
                normalization=card["normalization"],
                temperature=float(card["temperature"]),
                card=card,
                ood_source=out.with_name(card["ood"]["file"]),
                architecture=f"{base.architecture} (adapted: {card['adaptation']['method']})"[:60],
            )
            if AdaptationJob.objects.select_for_update().filter(pk=job.pk, cancel_requested=True).exists():
                raise Cancelled("cancelled by the lab")
            _finish(
                job, AdaptationJob.Status.READY, stage="ready: compare, then promote or discard", progress=1.0,
                evaluation=evaluation, result_model=record,
            )  # fmt: skip
    except BaseException:
        if record is not None:
            remove_files(record)
        raise
    return "ready"
