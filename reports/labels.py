"""True labels for a batch: reading a ``filename,class`` CSV and matching its rows to the batch's images.

Forgiving where it is safe (a UTF-8 byte-order mark, ``;`` or ``,`` as delimiter, CRLF line ends, blank
lines, upper case and stray spaces in the header and the class names), strict where it matters: a file
that is not UTF-8 text, has no ``filename``/``class`` header or no data rows is refused with a sentence
(:class:`LabelFileError`). Rows that cannot be used (an unknown class, a file named twice, a missing value,
a file that is not in the batch) are *reported* with their row numbers, never silently dropped.

Pure Python: no Django models here, so it is easy to test and to reuse.
"""

from __future__ import annotations

import csv
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, TypedDict

FILENAME_HEADER = "filename"
CLASS_HEADER = "class"
DELIMITERS = (",", ";", "\t")
MAX_LABEL_BYTES = 5 * 1024 * 1024


class LabelFileError(ValueError):
    """The label file as a whole cannot be used; the message is a sentence for the user."""


class RowProblem(TypedDict):
    """One CSV row that was not used, and why. ``row`` is the line number in the file (the header is 1)."""

    row: int
    filename: str
    value: str
    detail: str


class DuplicateProblem(TypedDict):
    """A file named on more than one row: every row number and the class written on each."""

    filename: str
    rows: list[int]
    values: list[str]
    detail: str


@dataclass(frozen=True)
class LabelRow:
    row: int
    filename: str
    class_name: str  # canonical spelling, one of the model's class names


@dataclass
class ParsedLabels:
    """The usable labels of a file (one per file name) and every row that could not be used."""

    labels: list[LabelRow]
    class_names: list[str]
    delimiter: str
    n_rows: int
    unknown_classes: list[RowProblem] = field(default_factory=list)
    duplicates: list[DuplicateProblem] = field(default_factory=list)
    invalid_rows: list[RowProblem] = field(default_factory=list)
    # file names in the file without a usable label (unknown class, conflicting duplicates, no class)
    unusable_filenames: list[str] = field(default_factory=list)


class BatchItemLike(Protocol):
    original_filename: str
    prediction: Any  # None until the image is classified


@dataclass(frozen=True)
class MatchedLabel:
    item: Any  # a BatchItemLike with a prediction
    class_name: str
    row: int


@dataclass
class LabelMatch:
    """Labels paired with classified batch images, and what did not pair up."""

    matched: list[MatchedLabel]
    unmatched_rows: list[RowProblem] = field(default_factory=list)  # the file is not (unambiguously) in the batch
    not_classified: list[RowProblem] = field(default_factory=list)  # in the batch, but the image failed
    unlabelled: list[str] = field(default_factory=list)  # classified batch images no row names
    duplicates: list[DuplicateProblem] = field(default_factory=list)  # two names for the same image


def _decode(data: bytes) -> str:
    if data.startswith((b"\xff\xfe", b"\xfe\xff")):
        raise LabelFileError(
            "The label file is UTF-16 text; save it as “CSV UTF-8 (comma delimited)” and upload it again."
        )
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise LabelFileError(
            "The label file is not UTF-8 text (is it an Excel workbook or another encoding?); "
            "save it as “CSV UTF-8” with the columns filename,class and upload it again."
        ) from exc
    if "\x00" in text:
        raise LabelFileError("The label file is not a text file; upload a CSV with the columns filename,class.")
    return text


def _normalise(value: str) -> str:
    return value.strip().lower()


def _find_header(lines: list[str]) -> tuple[int, str, int, int]:
    """(index of the header line, delimiter, filename column, class column) from the first non-blank line."""
    for index, line in enumerate(lines):
        if not line.strip():
            continue
        candidates = []
        for delimiter in DELIMITERS:
            try:
                cells = [_normalise(c) for c in next(csv.reader([line], delimiter=delimiter))]
            except (csv.Error, StopIteration):
                continue
            if FILENAME_HEADER in cells and CLASS_HEADER in cells:
                candidates.append((line.count(delimiter), delimiter, cells))
        if not candidates:
            raise LabelFileError(
                "The label file has no header row with the columns “filename” and “class” "
                f"(its first line is {line.strip()[:80]!r}); add the header filename,class as the first line."
            )
        _, delimiter, cells = max(candidates, key=lambda c: c[0])
        return index, delimiter, cells.index(FILENAME_HEADER), cells.index(CLASS_HEADER)
    raise LabelFileError("The label file is empty: it needs a header filename,class and one row per image.")


def parse_label_csv(data: bytes, class_names: Sequence[str]) -> ParsedLabels:
    """Read a ``filename,class`` CSV. Raises :class:`LabelFileError` when the file as a whole is unusable."""
    if len(data) > MAX_LABEL_BYTES:
        raise LabelFileError(f"The label file is too large: at most {MAX_LABEL_BYTES // (1024 * 1024)} MB.")
    lines = _decode(data).splitlines()
    header_index, delimiter, filename_col, class_col = _find_header(lines)
    canonical = {_normalise(name): name for name in class_names}
    known = ", ".join(class_names)

    rows: list[tuple[int, str, str]] = []  # (row number, file name, class as written)
    invalid: list[RowProblem] = []
    reader = csv.reader(lines[header_index + 1 :], delimiter=delimiter)
    try:
        for cells in reader:
            row_number = header_index + 1 + reader.line_num
            if not any(c.strip() for c in cells):
                continue  # blank line
            filename = cells[filename_col].strip() if filename_col < len(cells) else ""
            value = cells[class_col].strip() if class_col < len(cells) else ""
            if not filename or not value:
                missing = "file name" if not filename else "class"
                invalid.append(
                    {"row": row_number, "filename": filename, "value": value, "detail": f"no {missing} on this row"}
                )
                continue
            rows.append((row_number, filename, value))
    except csv.Error as exc:
        raise LabelFileError(f"The label file is not valid CSV near line {reader.line_num}: {exc}.") from exc
    if not rows and not invalid:
        raise LabelFileError("The label file has a header but no data rows: add one row per image (filename,class).")

    parsed = ParsedLabels(labels=[], class_names=list(class_names), delimiter=delimiter, n_rows=len(rows))
    parsed.invalid_rows = invalid
    parsed.unusable_filenames = [p["filename"] for p in invalid if p["filename"]]
    by_file: dict[str, list[tuple[int, str]]] = defaultdict(list)
    for row_number, filename, value in rows:
        by_file[filename].append((row_number, value))
        if _normalise(value) not in canonical:
            parsed.unknown_classes.append(
                {
                    "row": row_number,
                    "filename": filename,
                    "value": value,
                    "detail": f"not one of the model's classes ({known})",
                }
            )
    for filename, entries in by_file.items():
        resolved = {canonical.get(_normalise(value)) for _, value in entries}
        usable = len(resolved) == 1 and None not in resolved
        if len(entries) > 1:
            detail = (
                "named on several rows with the same class: counted once"
                if usable
                else "named on several rows with different or unknown classes: left out of the metrics"
            )
            parsed.duplicates.append(
                {
                    "filename": filename,
                    "rows": [row for row, _ in entries],
                    "values": [value for _, value in entries],
                    "detail": detail,
                }
            )
        if usable:
            parsed.labels.append(LabelRow(entries[0][0], filename, resolved.pop()))
        elif filename not in parsed.unusable_filenames:
            parsed.unusable_filenames.append(filename)
    return parsed


def basename(name: str) -> str:
    """The last part of a path written with / or \\ (zip members look like ``slide.zip/folder/cell.png``)."""
    return name.replace("\\", "/").rsplit("/", 1)[-1]


class _Resolver:
    """Finds the batch item a label names: exactly, else by a base name that is unique in the batch."""

    def __init__(self, items: Sequence[BatchItemLike]):
        self.exact: dict[str, list[BatchItemLike]] = defaultdict(list)
        self.by_base: dict[str, list[BatchItemLike]] = defaultdict(list)
        for item in items:
            self.exact[item.original_filename].append(item)
            self.by_base[basename(item.original_filename)].append(item)

    def resolve(self, name: str) -> tuple[BatchItemLike | None, str]:
        """(the item, "") or (None, why not)."""
        found = self.exact.get(name) or self.by_base.get(basename(name)) or []
        if len(found) == 1:
            return found[0], ""
        if not found:
            return None, "this file is not in the batch"
        return None, (
            f"{len(found)} images in the batch have this name; write the full name as the batch lists it "
            f"(for example {found[0].original_filename})"
        )


def match_labels(parsed: ParsedLabels, batch_items: Iterable[BatchItemLike]) -> LabelMatch:
    """Pair each usable label with its batch image and report what did not pair up."""
    items = list(batch_items)
    resolver = _Resolver(items)
    result = LabelMatch(matched=[])
    claimed: dict[int, list[LabelRow]] = defaultdict(list)  # id(item) -> label rows naming it
    item_by_id = {id(item): item for item in items}
    for label in parsed.labels:
        item, why = resolver.resolve(label.filename)
        if item is None:
            result.unmatched_rows.append(
                {"row": label.row, "filename": label.filename, "value": label.class_name, "detail": why}
            )
        elif item.prediction is None:
            result.not_classified.append(
                {
                    "row": label.row,
                    "filename": label.filename,
                    "value": label.class_name,
                    "detail": "the batch could not classify this image",
                }
            )
        else:
            claimed[id(item)].append(label)

    mentioned = set(claimed)
    for name in parsed.unusable_filenames:  # reported already; not "unlabelled" as well
        item, _ = resolver.resolve(name)
        if item is not None:
            mentioned.add(id(item))

    for key, labels in claimed.items():
        item = item_by_id[key]
        if len(labels) == 1:
            result.matched.append(MatchedLabel(item, labels[0].class_name, labels[0].row))
            continue
        same = len({label.class_name for label in labels}) == 1
        result.duplicates.append(
            {
                "filename": item.original_filename,
                "rows": [label.row for label in labels],
                "values": [label.class_name for label in labels],
                "detail": (
                    f"the same image under {len(labels)} names: counted once"
                    if same
                    else f"the same image under {len(labels)} names with different classes: left out of the metrics"
                ),
            }
        )
        if same:
            result.matched.append(MatchedLabel(item, labels[0].class_name, labels[0].row))
    result.matched.sort(key=lambda m: m.row)
    result.unlabelled = [
        item.original_filename for item in items if item.prediction is not None and id(item) not in mentioned
    ]
    return result
