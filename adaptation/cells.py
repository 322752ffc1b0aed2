"""The labelled cells a laboratory can adapt a model with, where they come from, and how a job splits them.

Sources: the technologists' classes of the lab's signed slides (``verified``), the true labels uploaded with the
lab's evaluation runs (``evaluation``), and a .zip with one folder per class (``upload``, stored by the job). One
stored image is one cell: labelled by several sources with the same class it counts once, and labelled with
different classes it is left out (and counted, so the page can say so). A job keeps part of every class back
(``held_back``): never adapted or cross-validated on, only used to compare the base and the adapted model.
"""

from __future__ import annotations

import hashlib
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import PurePosixPath

from django.db.models import OuterRef, Subquery

from accounts.scoping import scoped
from reports.models import BatchItem, CellVerification, EvaluationRun, ReportVersion
from wbc_ml.adaptation.cells import MIN_CELLS_PER_CLASS, AdaptationRefused

VERIFIED, EVALUATION, UPLOAD = "verified", "evaluation", "upload"
SOURCE_LABELS = {
    VERIFIED: "verified cells of signed slides",
    EVALUATION: "labels of evaluation runs",
    UPLOAD: "uploaded .zip",
}
RECOMMENDED_PER_CLASS = 20
TRAIN, HELD_BACK, NON_WBC = "train", "held_back", "non_wbc"  # a job's roles of cells


@dataclass(frozen=True)
class LabelledCell:
    """One labelled image: its file in the media storage, its class, its source(s) and its name in the card."""

    image: str
    class_name: str
    source: str
    name: str

    def as_dict(self, role: str) -> dict:
        return {"image": self.image, "class": self.class_name, "source": self.source, "name": self.name, "role": role}


@dataclass
class LabCells:
    """The lab's labelled cells (one per stored image), the per-source counts, and what was left out."""

    class_names: list[str]
    cells: list[LabelledCell] = field(default_factory=list)
    per_source: dict[str, Counter] = field(default_factory=dict)
    conflicts: int = 0  # images labelled with different classes by different sources: left out
    non_wbc: list[str] = field(default_factory=list)  # verified non-WBC cells (platelets, smudge cells...)

    def counts(self) -> dict[str, int]:
        counted = Counter(cell.class_name for cell in self.cells)
        return {name: counted[name] for name in self.class_names}

    def short_classes(self) -> dict[str, int]:
        return {name: n for name, n in self.counts().items() if n < MIN_CELLS_PER_CLASS}


def _signed_items(user):
    """The lab's batch items whose slide's latest report version is signed."""
    latest_signed = ReportVersion.objects.filter(batch=OuterRef("item__batch")).order_by("-number").values("signed_at")
    return (
        scoped(CellVerification, user)
        .annotate(latest_signed_at=Subquery(latest_signed[:1]))
        .filter(latest_signed_at__isnull=False)
        .exclude(item__image="")
        .select_related("item")
    )


def _item_name(item: BatchItem) -> str:
    return f"item{item.pk}-{PurePosixPath(item.original_filename.replace(chr(92), '/')).name}"


def verified_cells(user, class_names: list[str]) -> tuple[list[LabelledCell], list[str]]:
    """(WBC cells, images of non-WBC categories) verified by technologists on the lab's signed slides."""
    wbc, non_wbc = [], []
    for verification in _signed_items(user):
        item = verification.item
        if verification.verified_class in class_names:
            wbc.append(LabelledCell(item.image.name, verification.verified_class, VERIFIED, _item_name(item)))
        else:
            non_wbc.append(item.image.name)
    return wbc, non_wbc


def evaluation_cells(user, class_names: list[str]) -> list[LabelledCell]:
    """The images of the lab's evaluation runs with the true class uploaded for them."""
    cells = []
    for run in scoped(EvaluationRun, user).exclude(labels={}).only("batch_id", "labels"):
        items = BatchItem.objects.filter(batch_id=run.batch_id, pk__in=[int(k) for k in run.labels]).exclude(image="")
        for item in items:
            class_name = run.labels[str(item.pk)]
            if class_name in class_names:
                cells.append(LabelledCell(item.image.name, class_name, EVALUATION, _item_name(item)))
    return cells


def lab_cells(user, class_names: list[str], sources: list[str], uploaded: list[LabelledCell] | None = None) -> LabCells:
    """The lab's labelled cells from ``sources``, one per stored image (conflicting labels left out)."""
    found = LabCells(list(class_names))
    by_source: dict[str, list[LabelledCell]] = {}
    if VERIFIED in sources:
        by_source[VERIFIED], found.non_wbc = verified_cells(user, class_names)
    if EVALUATION in sources:
        by_source[EVALUATION] = evaluation_cells(user, class_names)
    if uploaded:
        by_source[UPLOAD] = list(uploaded)
    by_image: dict[str, list[LabelledCell]] = defaultdict(list)
    for source, cells in by_source.items():
        found.per_source[source] = Counter(cell.class_name for cell in cells)
        for cell in cells:
            by_image[cell.image].append(cell)
    for image in sorted(by_image):
        labels = by_image[image]
        if len({cell.class_name for cell in labels}) > 1:
            found.conflicts += 1
            continue
        sources_of = "+".join(sorted({cell.source for cell in labels}))
        found.cells.append(LabelledCell(image, labels[0].class_name, sources_of, labels[0].name))
    return found


def refuse_if_short(found: LabCells) -> None:
    """Below ``MIN_CELLS_PER_CLASS`` labelled cells of any class there is nothing honest to adapt or to measure."""
    short = found.short_classes()
    if short:
        listed = ", ".join(f"{name} {n}" for name, n in short.items())
        raise AdaptationRefused(
            f"Too few labelled cells to adapt: every class needs at least {MIN_CELLS_PER_CLASS} "
            f"({RECOMMENDED_PER_CLASS} or more are recommended). Short: {listed}. Verify more cells of these classes "
            "on signed slides, label them in an evaluation run, or add them to the .zip."
        )


def _order_key(seed: int, cell: LabelledCell) -> str:
    return hashlib.sha256(f"{seed}:{cell.image}".encode()).hexdigest()


def split_cells(
    cells: list[LabelledCell],
    class_names: list[str],
    *,
    seed: int,
    held_back_share: float,
    max_train: int,
    max_held: int,
) -> list[dict]:
    """Every class split the same seeded way: a share held back (at least one cell), the rest (capped) for training.

    The held-back cells are neither adapted nor cross-validated on; the job compares the models on them only.
    """
    chosen = []
    for name in class_names:
        members = sorted((c for c in cells if c.class_name == name), key=lambda c: _order_key(seed, c))
        held = min(max(1, int(len(members) * held_back_share)), max_held)
        chosen += [cell.as_dict(HELD_BACK) for cell in members[:held]]
        chosen += [cell.as_dict(TRAIN) for cell in members[held : held + max_train]]
    return chosen
