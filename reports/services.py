"""Evaluation runs (a finished batch scored against uploaded true labels) and re-running a batch with another model."""

from __future__ import annotations

import hashlib
import math
import uuid
import warnings
from pathlib import PurePath
from typing import Any

import numpy as np
from django.core.files.base import ContentFile
from django.db import transaction
from django.utils import timezone
from sklearn.exceptions import UndefinedMetricWarning

from classifier.models import ClassifierModel
from wbc_ml.metrics import classification_report
from wbc_ml.review_flag import THRESHOLD_MAX, THRESHOLD_MIN

from . import figures, submission
from .labels import LabelMatch, ParsedLabels, match_labels, parse_label_csv
from .models import Batch, BatchItem, EvaluationRun

SUBSETS = ("all", "confident", "flagged")


class Refused(ValueError):
    """A request the service declines; the message is a sentence for the user. Nothing was stored."""


def _finite(value: Any) -> Any:
    """JSON-safe copy: NaN/inf (e.g. kappa of a one-class subset) become None, numpy scalars plain numbers."""
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(v) for v in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _probabilities(prediction, class_names: list[str]) -> list[float]:
    """The prediction's probabilities in ``class_names`` order (the batch model's order)."""
    own = list(prediction.model.class_names)
    if own == class_names:
        return [float(p) for p in prediction.probabilities]
    by_name = dict(zip(own, prediction.probabilities, strict=True))
    return [float(by_name.get(name, 0.0)) for name in class_names]


def _report(labels: list[int], probs: list[list[float]], class_names: list[str], threshold: float) -> dict:
    if not labels:
        return {"n": 0}
    with warnings.catch_warnings():  # undefined values (kappa of a one-class subset) are stored as null
        warnings.simplefilter("ignore", UndefinedMetricWarning)
        report = classification_report(np.array(labels), np.array(probs), class_names, threshold)
    return _finite(dict(report))


def problems_of(parsed: ParsedLabels, match: LabelMatch) -> dict[str, Any]:
    return {
        "unknown_classes": parsed.unknown_classes,
        "duplicates": parsed.duplicates + match.duplicates,
        "invalid_rows": parsed.invalid_rows,
        "unmatched_rows": match.unmatched_rows,
        "not_classified": match.not_classified,
        "unlabelled_images": match.unlabelled,
    }


def _misclassified(match: LabelMatch, class_names: list[str], threshold: float) -> list[dict[str, Any]]:
    rows = []
    for pair in match.matched:
        p = pair.item.prediction
        if p.predicted_class != pair.class_name:
            rows.append(
                {
                    "filename": pair.item.original_filename,
                    "true": pair.class_name,
                    "predicted": p.predicted_class,
                    "confidence": round(float(p.confidence), 4),
                    "flagged": p.needs_review(threshold),
                    "prediction": str(p.uid),
                }
            )
    return rows


def create_evaluation(
    user, batch: Batch, uploaded_bytes: bytes, filename: str, threshold: float | None = None
) -> EvaluationRun:
    """Score a finished batch against a ``filename,class`` CSV and store the run with its figures.

    Raises :class:`reports.labels.LabelFileError` for an unusable file and :class:`Refused` when the batch is
    not finished or no label matches a classified image; in both cases nothing is stored.
    """
    if batch.laboratory_id != user.laboratory_id:
        raise Refused("This batch belongs to another laboratory.")
    if batch.status != Batch.Status.DONE:
        raise Refused("The batch is not finished yet: evaluate it once every image has been classified.")
    threshold = batch.threshold if threshold is None else float(threshold)
    if not THRESHOLD_MIN <= threshold <= THRESHOLD_MAX:
        raise Refused(f"The threshold must be between {THRESHOLD_MIN:.2f} and {THRESHOLD_MAX:.2f}.")
    record = batch.model
    class_names = list(record.class_names)
    parsed = parse_label_csv(uploaded_bytes, class_names)
    items = list(batch.items.select_related("prediction__model").order_by("position", "id"))
    match = match_labels(parsed, items)
    if not match.matched:
        raise Refused(
            "No usable label row names a classified image of this batch "
            f"({len(parsed.labels)} usable of {parsed.n_rows + len(parsed.invalid_rows)} rows); "
            "check that the file names are the ones the batch lists."
        )

    index = {name: i for i, name in enumerate(class_names)}
    subsets: dict[str, tuple[list[int], list[list[float]]]] = {name: ([], []) for name in SUBSETS}
    for pair in match.matched:
        prediction = pair.item.prediction
        label, probs = index[pair.class_name], _probabilities(prediction, class_names)
        for subset in ("all", "flagged" if prediction.needs_review(threshold) else "confident"):
            subsets[subset][0].append(label)
            subsets[subset][1].append(probs)
    metrics = {"class_names": class_names, "threshold": threshold}
    metrics.update({name: _report(labels, probs, class_names, threshold) for name, (labels, probs) in subsets.items()})
    metrics["misclassified"] = _misclassified(match, class_names, threshold)

    all_labels, all_probs = subsets["all"]
    title = f"{batch.name} · {record.name} v{record.version}"
    confusion = figures.confusion_matrix_png(metrics["all"]["confusion_matrix"], class_names, title=title)
    roc = figures.roc_curves_png(all_labels, np.array(all_probs), class_names, title=title)

    run = EvaluationRun(
        uid=uuid.uuid4(),
        laboratory_id=batch.laboratory_id,
        batch=batch,
        model=record,
        model_version=record.version,
        threshold=threshold,
        user=user,
        labels_sha256=hashlib.sha256(uploaded_bytes).hexdigest(),
        labels_filename=PurePath(filename.replace("\\", "/")).name[-255:] or "labels.csv",
        n_labelled=len(match.matched),
        metrics=metrics,
        labels={str(pair.item.pk): pair.class_name for pair in match.matched},
        problems=problems_of(parsed, match),
    )
    stored: list[str] = []
    storage = EvaluationRun._meta.get_field("confusion_png").storage
    try:
        with transaction.atomic():
            run.confusion_png.save(f"{run.uid}-confusion.png", ContentFile(confusion), save=False)
            stored.append(run.confusion_png.name)
            run.roc_png.save(f"{run.uid}-roc.png", ContentFile(roc), save=False)
            stored.append(run.roc_png.name)
            run.save()
    except Exception:
        for name in stored:  # nothing half-stored
            storage.delete(name)
        raise
    return run


def rerun_batch(user, batch: Batch, model_record: ClassifierModel) -> Batch:
    """A new batch in the same lab with the same stored images, queued for ``model_record``.

    Items point at the same stored files (no copies); items that failed are copied as failed with their error.
    """
    if batch.laboratory_id != user.laboratory_id:
        raise Refused("This batch belongs to another laboratory.")
    if not model_record.is_active or model_record.laboratory_id not in (None, batch.laboratory_id):
        raise Refused("That model is not available to your laboratory.")
    if model_record.pk == batch.model_id:
        raise Refused(f"This batch was already classified with {model_record}; choose another model.")
    if not batch.is_finished:  # its images may still be waiting in their upload, not yet in files of their own
        raise Refused("This batch is still being classified; re-run it once it is finished.")
    with transaction.atomic():
        new_batch = Batch.objects.create(
            laboratory_id=batch.laboratory_id,
            user=user,
            name=f"{batch.name} · {model_record.name}"[:200],
            external_id=batch.external_id,
            model=model_record,
            threshold=batch.threshold,
        )
        items = []
        for item in batch.items.order_by("position", "id"):
            copy = BatchItem(batch=new_batch, position=item.position, original_filename=item.original_filename)
            copy.image.name = item.image.name  # the same stored file, not a copy
            if item.status == BatchItem.Status.FAILED or not item.image.name:
                copy.status, copy.error = BatchItem.Status.FAILED, item.error or "no stored image"
            items.append(copy)
        BatchItem.objects.bulk_create(items)
        if not any(i.status == BatchItem.Status.PENDING for i in items):
            new_batch.status, new_batch.finished_at = Batch.Status.DONE, timezone.now()
            new_batch.save(update_fields=["status", "finished_at"])
        else:
            transaction.on_commit(lambda: submission.enqueue(new_batch))
    return new_batch
