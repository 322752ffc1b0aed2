"""Slide review and sign-off: the effective class of a cell, the cells still to review, reclassification (many cells
at once, one transaction), signing (password re-entered), countersigning (a second person, a Supervisor),
amendments (a reason, the next version) and the slide's state. Every change goes through the audit trail
(django-simple-history, ``audit`` app) with the acting user and a reason.

States are derived from the report versions, never stored twice: "in review" (no version, or v1 not signed yet),
"awaiting countersign" (signed, the lab wants two people, not countersigned), "final" (signed, countersigned if
required), "amending" (a version after a signed one, not signed yet). A slide is locked while its latest version is
signed.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from django.db import transaction
from django.db.models import Count, F, OuterRef, Q, QuerySet, Subquery
from django.utils import timezone

from accounts.models import CellCategory, LabSettings
from accounts.roles import SUPERVISOR
from wbc_ml.datasets import WBC_CLASSES

from .differential import Differential, build_differential, effective_class, lab_categories, review_items
from .models import Batch, BatchItem, CellVerification, ReportVersion

__all__ = [  # effective_class is defined beside the differential and offered here with the other review services
    "ReviewRefused",
    "SlideLocked",
    "SlideState",
    "amend",
    "categories_for",
    "countersign",
    "differential_payload",
    "effective_class",
    "filter_review",
    "is_to_review",
    "live_snapshot",
    "reclassify",
    "report_snapshot",
    "set_wbc_count",
    "sign",
    "slide_state",
    "state_of",
    "to_review",
    "with_review_counts",
]

IN_REVIEW, AWAITING_COUNTERSIGN, FINAL, AMENDING = "in review", "awaiting countersign", "final", "amending"
WBC_LABELS = {name: name.capitalize() for name in WBC_CLASSES}
WBC_HOTKEYS = {name: str(index + 1) for index, name in enumerate(WBC_CLASSES)}


class ReviewRefused(ValueError):
    """A review action the service declines; the message is a sentence for the user. Nothing was changed."""

    status = 400

    def __init__(self, message: str, status: int | None = None):
        super().__init__(message)
        if status is not None:
            self.status = status


class SlideLocked(ReviewRefused):
    """The slide's latest report version is signed: amend it first."""

    status = 409


@dataclass(frozen=True)
class SlideState:
    state: str
    latest: ReportVersion | None
    two_person: bool

    @property
    def locked(self) -> bool:
        return self.state in (AWAITING_COUNTERSIGN, FINAL)

    @property
    def version(self) -> int | None:
        return self.latest.number if self.latest else None


def slide_state(batch: Batch, lab_settings: LabSettings | None = None) -> SlideState:
    lab_settings = lab_settings or LabSettings.for_lab(batch.laboratory_id)
    latest = batch.report_versions.select_related("signed_by", "countersigned_by").order_by("-number").first()
    return state_of(latest, lab_settings.two_person_signoff)


def state_of(latest: ReportVersion | None, two_person: bool) -> SlideState:
    if latest is None or latest.signed_at is None:
        state = AMENDING if latest is not None and latest.number > 1 else IN_REVIEW
    elif two_person and latest.countersigned_at is None:
        state = AWAITING_COUNTERSIGN
    else:
        state = FINAL
    return SlideState(state, latest, two_person)


def categories_for(laboratory_id: int, categories: list[CellCategory] | None = None) -> list[dict[str, Any]]:
    """What a cell can be put in: the five WBC classes (keys 1–5), then the lab's active non-WBC categories."""
    categories = lab_categories(laboratory_id) if categories is None else categories
    wbc = [{"key": n, "label": WBC_LABELS[n], "hotkey": WBC_HOTKEYS[n], "is_wbc": True} for n in WBC_CLASSES]
    other = [{"key": c.key, "label": c.label, "hotkey": c.hotkey, "is_wbc": False} for c in categories if c.is_active]
    return wbc + other


def is_to_review(item: BatchItem, threshold: float) -> bool:
    """Flagged at the slide's threshold (low confidence or an outlier) and not verified yet."""
    return (
        item.prediction is not None
        and item.prediction.needs_review(threshold)
        and getattr(item, "verification", None) is None
    )


def to_review(batch: Batch, items: Iterable[BatchItem] | None = None) -> list[BatchItem]:
    return [item for item in (review_items(batch) if items is None else items) if is_to_review(item, batch.threshold)]


TO_REVIEW_ITEMS = Q(items__prediction__isnull=False, items__verification__isnull=True) & (
    Q(items__prediction__confidence__lt=F("threshold")) | Q(items__prediction__is_outlier=True)
)


def with_review_counts(batches: QuerySet) -> QuerySet:
    """Batches annotated in the same query with ``n_to_review`` (flagged at the slide's threshold, not verified)
    and ``latest_signed_at`` (null: the latest version is not signed, or there is none)."""
    latest = ReportVersion.objects.filter(batch=OuterRef("pk")).order_by("-number")
    return batches.annotate(
        n_to_review=Count("items", filter=TO_REVIEW_ITEMS),
        latest_signed_at=Subquery(latest.values("signed_at")[:1]),
    )


def filter_review(batches: QuerySet, review: str | None) -> QuerySet:
    """``to_review`` / ``signed`` / ``unsigned`` on batches annotated by :func:`with_review_counts`."""
    if review == "to_review":
        return batches.filter(n_to_review__gt=0)
    if review == "signed":
        return batches.filter(latest_signed_at__isnull=False)
    if review == "unsigned":
        return batches.filter(latest_signed_at__isnull=True)
    return batches


WBC_COUNT_MAX = 1000.0  # ×10⁹/L: Batch.wbc_count's validator


def set_wbc_count(batch: Batch, value: float | None) -> Batch:
    """Set (or clear) the sample's total WBC count, which gives the absolute counts; refused once signed."""
    if value is not None and not 0.0 <= value <= WBC_COUNT_MAX:
        raise ReviewRefused(f"The total WBC count must be between 0 and {WBC_COUNT_MAX:g} ×10⁹/L.")
    with transaction.atomic():
        locked = _locked_batch(batch)
        _refuse_if_locked(locked, LabSettings.for_lab(batch.laboratory_id))
        locked.wbc_count = value
        locked.save(update_fields=["wbc_count"])
    batch.wbc_count = value
    return batch


def _locked_batch(batch: Batch) -> Batch:
    """The batch row, locked for the rest of the transaction (reclassify and sign never interleave)."""
    return Batch.objects.select_for_update().get(pk=batch.pk)


def _refuse_if_locked(batch: Batch, lab_settings: LabSettings) -> SlideState:
    current = slide_state(batch, lab_settings)
    if current.locked:
        raise SlideLocked(
            f"Version {current.version} of this report is signed; the slide is locked. "
            "Open an amendment (with its reason) to change a cell."
        )
    return current


def reclassify(
    user,
    batch: Batch,
    item_ids: Iterable[int],
    new_class: str | None,
    *,
    lab_settings: LabSettings | None = None,
    categories: list[CellCategory] | None = None,
) -> list[BatchItem]:
    """Give many cells of one slide the technologist's class at once (one transaction, one audit row per changed
    cell). ``new_class=None`` removes the verifications (undo), which the audit trail records too."""
    try:
        ids = sorted({int(i) for i in item_ids})
    except (TypeError, ValueError) as exc:
        raise ReviewRefused("Cells are given by their numeric ids.") from exc
    if not ids:
        raise ReviewRefused("Choose at least one cell.")
    if new_class is not None:
        active = {c["key"] for c in categories_for(batch.laboratory_id, categories)}
        if new_class not in active:
            raise ReviewRefused(f"“{new_class}” is not one of your laboratory's classes or categories.")
    lab_settings = lab_settings or LabSettings.for_lab(batch.laboratory_id)
    now = timezone.now()
    with transaction.atomic():
        batch = _locked_batch(batch)
        _refuse_if_locked(batch, lab_settings)
        items = list(
            batch.items.filter(pk__in=ids, prediction__isnull=False).select_related(
                "prediction", "verification", "verification__verified_by"
            )
        )
        if len(items) != len(ids):
            raise ReviewRefused("Some of these cells are not classified cells of this slide; nothing was changed.")
        for item in items:
            verification = getattr(item, "verification", None)
            if new_class is None:
                if verification is not None:
                    verification._history_user = user
                    verification._change_reason = "verification removed"
                    verification.delete()
                    item.verification = None
                continue
            if verification is not None and verification.verified_class == new_class:
                continue
            if verification is None:
                verification = CellVerification(item=item)
            reason = f"{getattr(verification, 'verified_class', '') or item.prediction.predicted_class} -> {new_class}"
            verification.verified_class, verification.verified_by, verification.verified_at = new_class, user, now
            verification._history_user = user
            verification._change_reason = f"reclassified {reason}"
            verification.save()
            item.verification = verification
    return sorted(items, key=lambda i: (i.position, i.pk))


def _check_password(user, password: str) -> None:
    if not password or not user.check_password(password):
        raise ReviewRefused("The password is not correct: sign-off needs your own password, typed again.", 403)


def sign(user, batch: Batch, password: str) -> ReportVersion:
    """Sign the slide's report: version 1, or the open amendment. Refused (with the reason) while cells remain to
    review, while cells are unverified when the lab requires all verified, or when the version is already signed."""
    _check_password(user, password)
    lab_settings = LabSettings.for_lab(batch.laboratory_id)
    with transaction.atomic():
        batch = _locked_batch(batch)
        if batch.status != Batch.Status.DONE:
            raise ReviewRefused("The slide is still being classified; sign it once every image is done.", 409)
        current = slide_state(batch, lab_settings)
        if current.locked:
            raise SlideLocked(f"Version {current.version} of this report is already signed.")
        items = list(review_items(batch))
        remaining = to_review(batch, items)
        if remaining:
            raise ReviewRefused(
                f"{len(remaining)} flagged cell{'s' if len(remaining) != 1 else ''} still to review: "
                "give each one your class before signing."
            )
        if lab_settings.require_all_verified:
            unverified = sum(1 for i in items if i.prediction_id and getattr(i, "verification", None) is None)
            if unverified:
                raise ReviewRefused(
                    f"Your laboratory signs only fully verified slides: {unverified} "
                    f"cell{'s are' if unverified != 1 else ' is'} not verified yet."
                )
        now = timezone.now()
        version = current.latest or ReportVersion(batch=batch, number=1, opened_by=user, opened_at=now)
        version.signed_by, version.signed_at = user, now
        report = build_differential(batch, batch.threshold, lab_settings=lab_settings, items=items)
        version.snapshot = report_snapshot(batch, report, version, lab_settings)
        version._history_user = user
        version._change_reason = f"signed v{version.number}"
        version.save()
    return version


def countersign(user, batch: Batch, password: str) -> ReportVersion:
    """The second signature of a two-person lab: a Supervisor who is not the signer."""
    if not user.groups.filter(name=SUPERVISOR).exists():
        raise ReviewRefused("Only a Supervisor can countersign a report.", 403)
    _check_password(user, password)
    lab_settings = LabSettings.for_lab(batch.laboratory_id)
    with transaction.atomic():
        batch = _locked_batch(batch)
        current = slide_state(batch, lab_settings)
        if current.state != AWAITING_COUNTERSIGN:
            raise ReviewRefused("This report is not waiting for a countersignature.", 409)
        version = current.latest
        if version.signed_by_id == user.pk:
            raise ReviewRefused("The countersignature must come from a second person, not the signer.", 403)
        version.countersigned_by, version.countersigned_at = user, timezone.now()
        version.snapshot = {**version.snapshot, **_signatures(version)}
        version._history_user = user
        version._change_reason = f"countersigned v{version.number}"
        version.save()
    return version


def amend(user, batch: Batch, reason: str) -> ReportVersion:
    """Open the next version of a signed report, with its reason; the slide unlocks until it is signed again."""
    reason = (reason or "").strip()
    if not reason:
        raise ReviewRefused("Give the reason for the amendment.")
    lab_settings = LabSettings.for_lab(batch.laboratory_id)
    with transaction.atomic():
        batch = _locked_batch(batch)
        current = slide_state(batch, lab_settings)
        if not current.locked:
            raise ReviewRefused("Only a signed report can be amended; this one is still open.", 409)
        version = ReportVersion(
            batch=batch,
            number=current.latest.number + 1,
            amendment_reason=reason,
            opened_by=user,
            opened_at=timezone.now(),
        )
        version._history_user = user
        version._change_reason = f"amendment opened v{version.number}: {reason}"[:100]
        version.save()
    return version


# --- the snapshot: the report exactly as signed --------------------------------------------------------------------


def _person(user) -> str | None:
    if user is None:
        return None
    return user.get_full_name() or user.get_username()


def _when(moment) -> str | None:
    return moment.isoformat(timespec="seconds") if moment else None


def _signatures(version: ReportVersion) -> dict[str, Any]:
    return {
        "version": version.number,
        "amendment_reason": version.amendment_reason,
        "opened_by": _person(version.opened_by),
        "opened_at": _when(version.opened_at),
        "signed_by": _person(version.signed_by),
        "signed_at": _when(version.signed_at),
        "countersigned_by": _person(version.countersigned_by),
        "countersigned_at": _when(version.countersigned_at),
    }


def differential_payload(report: Differential) -> dict[str, Any]:
    """The verified differential as JSON: the review page, the snapshot and the printable report read this."""
    overall = report.agreement_overall
    return {
        "classified": report.classified,
        "verified": report.verified,
        "unverified": report.unverified,
        "to_review": report.to_review,
        "counts": report.counts,
        "differential": [
            {
                "class": t.name,
                "count": t.count,
                "percent": t.shown_percent,
                "low": t.low,
                "high": t.high,
                "flag": t.flag,
                "absolute": t.absolute,
            }
            for t in report.tallies
        ],
        "non_wbc": [
            {"key": c.key, "label": c.label, "count": c.count, "per_100_wbc": c.per_100_wbc} for c in report.non_wbc
        ],
        "agreement": {
            "verified": overall.verified,
            "agreeing": overall.agreeing,
            "share": overall.share,
            "per_class": [
                {"class": a.name, "verified": a.verified, "agreeing": a.agreeing, "share": a.share}
                for a in report.agreement
            ],
        },
        "out_of_scope": {**report.out_of_scope, "warning": report.out_of_scope_warning},
    }


def report_snapshot(
    batch: Batch, report: Differential, version: ReportVersion | None, lab_settings: LabSettings
) -> dict[str, Any]:
    """Everything the printable report shows, as plain JSON (stored in ReportVersion.snapshot at sign-off)."""
    model = batch.model
    verifiers: dict[str, int] = {}
    for item in report.items:
        verification = getattr(item, "verification", None)
        if verification is not None:
            name = _person(verification.verified_by)
            verifiers[name] = verifiers.get(name, 0) + 1
    snapshot = {
        "laboratory": str(batch.laboratory),
        "batch": str(batch.uid),
        "slide": batch.name,
        "accession": batch.external_id,
        "created_at": _when(batch.created_at),
        "model": {"name": model.name, "version": model.version, "sha256": model.sha256 or None},
        "threshold": batch.threshold,
        "wbc_count": batch.wbc_count,
        "failed": report.failed_count,
        "two_person_signoff": lab_settings.two_person_signoff,
        **differential_payload(report),
        "verifiers": [{"user": name, "cells": n} for name, n in sorted(verifiers.items())],
    }
    if version is not None:
        snapshot.update(_signatures(version))
    else:
        snapshot.update(dict.fromkeys(["version", "opened_by", "opened_at", "signed_by", "signed_at"]))
        snapshot.update({"amendment_reason": "", "countersigned_by": None, "countersigned_at": None})
    return snapshot


def live_snapshot(batch: Batch, lab_settings: LabSettings | None = None) -> dict[str, Any]:
    """The report as it stands now (for an unsigned version), in the snapshot's shape."""
    lab_settings = lab_settings or LabSettings.for_lab(batch.laboratory_id)
    current = slide_state(batch, lab_settings)
    report = build_differential(batch, batch.threshold, lab_settings=lab_settings)
    return report_snapshot(batch, report, current.latest, lab_settings)
