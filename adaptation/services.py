"""Starting, cancelling, promoting and discarding adaptation jobs: the rules, one place, every change audited.

Only a Model admin (who may change the lab's models) acts; every lookup is scoped to the user's laboratory.
"""

from __future__ import annotations

from datetime import timedelta

from django.conf import settings
from django.core.exceptions import PermissionDenied
from django.db import transaction
from django.db.models import Q, QuerySet
from django.utils import timezone

from accounts.scoping import scoped
from classifier.models import ClassifierModel
from wbc_ml.adaptation.cells import AdaptationRefused

from .cells import NON_WBC, UPLOAD, lab_cells, refuse_if_short, split_cells
from .models import AdaptationJob
from .uploads import remove_stored, store_zip

MANAGE_PERMISSION = "classifier.change_classifiermodel"  # the Model admin's: who may change the lab's models
MAX_NON_WBC_CELLS = 200


def may_manage(user) -> bool:
    return bool(getattr(user, "laboratory_id", None)) and user.has_perm(MANAGE_PERMISSION)


def _require_manager(user) -> None:
    if not may_manage(user):
        raise PermissionDenied("Only your laboratory's Model admins may adapt, promote or discard models.")


def adaptable_models(user) -> QuerySet:
    """Base models a lab may adapt: the bundled ones and the lab's own adapted models (never an uploaded file, which
    is only ever loaded inside the vetting sandbox)."""
    own_adapted = Q(laboratory_id=user.laboratory_id, card__has_key="adaptation")
    return scoped(ClassifierModel.objects.usable(), user).filter(Q(is_bundled=True) | own_adapted)


def _audited_save(instance, user, reason: str, fields: list[str] | None = None) -> None:
    instance._history_user = user  # django-simple-history records who and why
    instance._change_reason = reason[:100]
    instance.save(update_fields=fields)


def start_job(user, base_model: ClassifierModel, sources: list[str], upload=None, seed: int = 0) -> AdaptationJob:
    """Gather the lab's labelled cells, refuse too few, split off the held-back cells, store the job and queue it.

    Raises :class:`AdaptationRefused` (or :class:`reports.uploads.UploadRefused` for a bad .zip) with the reason;
    nothing is stored then.
    """
    _require_manager(user)
    if not adaptable_models(user).filter(pk=base_model.pk).exists():
        raise AdaptationRefused("That model cannot be adapted by your laboratory.")
    if scoped(AdaptationJob, user).filter(status__in=AdaptationJob.ACTIVE).exists():
        raise AdaptationRefused(
            "An adaptation of your laboratory is already queued or running: wait for it or cancel it."
        )
    job = AdaptationJob(laboratory_id=user.laboratory_id, started_by=user, base_model=base_model, seed=seed)
    class_names = list(base_model.class_names)
    uploaded = store_zip(upload, class_names, f"adaptation/{user.laboratory_id}/{job.uid}") if upload else []
    try:
        found = lab_cells(user, class_names, sources, uploaded)
        refuse_if_short(found)
        job.cells = split_cells(
            found.cells,
            class_names,
            seed=seed,
            held_back_share=settings.WBC_ADAPT_HELD_BACK_PERCENT / 100,
            max_train=settings.WBC_ADAPT_MAX_TRAIN_PER_CLASS,
            max_held=settings.WBC_ADAPT_MAX_HELD_BACK_PER_CLASS,
        ) + [{"image": image, "role": NON_WBC} for image in found.non_wbc[:MAX_NON_WBC_CELLS]]
        job.sources = sorted(set(sources) | ({UPLOAD} if uploaded else set()))
        job.base_sha256 = base_model.sha256
        job.config = {**settings.WBC_ADAPT_CONFIG, "seed": seed}
        with transaction.atomic():
            _audited_save(job, user, f"adaptation of {base_model} started")
            transaction.on_commit(lambda: enqueue(job))
    except BaseException:
        remove_stored([cell.image for cell in uploaded])
        raise
    return job


def enqueue(job: AdaptationJob) -> None:
    from reports.wakeup import WORKER, notify

    from .tasks import run_adaptation

    run_adaptation.enqueue(job.pk)
    notify(WORKER)


def cancel(user, job: AdaptationJob) -> AdaptationJob:
    """A queued job stops at once; a running one at its next step (the worker sees the flag and cleans up). A running
    job whose worker stored nothing for ``WBC_ADAPT_STALE_SECONDS`` (the worker died) is cancelled outright."""
    _require_manager(user)
    with transaction.atomic():
        job = AdaptationJob.objects.select_for_update().get(pk=job.pk)
        if job.status == AdaptationJob.Status.QUEUED or (job.status == AdaptationJob.Status.RUNNING and _stale(job)):
            job.status, job.finished_at, job.cancel_requested = AdaptationJob.Status.CANCELLED, timezone.now(), True
            job.stage = "cancelled before it ran" if job.started_at is None else "cancelled: the worker had stopped"
            _audited_save(job, user, "adaptation cancelled")
        elif job.status == AdaptationJob.Status.RUNNING:
            if not job.cancel_requested:
                job.cancel_requested = True
                _audited_save(job, user, "cancel requested", ["cancel_requested"])
        else:
            raise AdaptationRefused(f"This adaptation is {job.get_status_display()}: there is nothing to cancel.")
    return job


def _stale(job: AdaptationJob) -> bool:
    last = job.updated_at or job.started_at
    return last is not None and timezone.now() - last > timedelta(seconds=settings.WBC_ADAPT_STALE_SECONDS)


def promote(user, job: AdaptationJob) -> AdaptationJob:
    """Make the adapted model the lab's default (the API and batches without a model use it)."""
    _require_manager(user)
    with transaction.atomic():
        job = AdaptationJob.objects.select_for_update(of=("self",)).select_related("result_model").get(pk=job.pk)
        if job.status != AdaptationJob.Status.READY or job.result_model is None or not job.result_model.is_active:
            raise AdaptationRefused(f"This adaptation is {job.get_status_display()}: only a ready one can be promoted.")
        lab = job.laboratory
        job.previous_default_id = lab.default_model_id
        lab.default_model = job.result_model
        _audited_save(lab, user, f"lab default model -> {job.result_model} (adaptation promoted)", ["default_model"])
        job.status, job.decided_by, job.decided_at = AdaptationJob.Status.PROMOTED, user, timezone.now()
        _audited_save(job, user, "adapted model promoted to the lab's default")
    return job


def discard(user, job: AdaptationJob) -> AdaptationJob:
    """Switch the adapted model off; if it is the lab's default, the default goes back to what it was before."""
    _require_manager(user)
    with transaction.atomic():
        job = AdaptationJob.objects.select_for_update(of=("self",)).select_related("result_model").get(pk=job.pk)
        if job.status not in (AdaptationJob.Status.READY, AdaptationJob.Status.PROMOTED) or job.result_model is None:
            raise AdaptationRefused(f"This adaptation is {job.get_status_display()}: there is no model to discard.")
        record, lab = job.result_model, job.laboratory
        if lab.default_model_id == record.pk:
            previous = job.previous_default
            usable = previous is not None and previous.is_active and previous.laboratory_id in (None, lab.pk)
            lab.default_model = previous if usable else None
            _audited_save(lab, user, f"lab default model -> {lab.default_model} (adaptation discarded)")
        record.is_active = False
        _audited_save(record, user, "adapted model discarded", ["is_active"])
        job.status, job.decided_by, job.decided_at = AdaptationJob.Status.DISCARDED, user, timezone.now()
        _audited_save(job, user, "adapted model discarded")
    return job
