"""Evaluation runs: true labels for a finished batch, their metrics and figures, and re-running a batch."""

import csv
import io
import json
from types import SimpleNamespace

import pytest
from django.core.files.uploadedfile import SimpleUploadedFile
from django.core.management import call_command
from django.urls import reverse
from PIL import Image

from accounts.models import User
from classifier.models import ClassifierModel
from reports import services
from reports.figures import confusion_matrix_png, roc_curves_png
from reports.labels import LabelFileError, match_labels, parse_label_csv
from reports.models import Batch, BatchItem, EvaluationRun
from reports.services import Refused, create_evaluation, rerun_batch
from reports.submission import submit_batch
from reports.uploads import NamedBytes
from tests.conftest import image_bytes, make_known_batch

CLASSES = ["basophil", "eosinophil", "lymphocyte", "monocyte", "neutrophil"]

# The known example: (file, predicted class index, confidence, outlier, true class).
# Correct: n1, n2, l1, e1 -> accuracy 4/6. Flagged at 0.85: n3 (0.80), l2 (outlier), e1 (0.60).
KNOWN = [
    ("n1.png", 4, 0.99, False, "neutrophil"),
    ("n2.png", 4, 0.90, False, "neutrophil"),
    ("n3.png", 4, 0.80, False, "lymphocyte"),
    ("l1.png", 2, 0.95, False, "lymphocyte"),
    ("l2.png", 2, 0.97, True, "monocyte"),
    ("e1.png", 1, 0.60, False, "eosinophil"),
]
KNOWN_CSV = ("filename,class\n" + "".join(f"{name},{true}\n" for name, *_, true in KNOWN)).encode()


def _csv(*rows: str, header: str = "filename,class", newline: str = "\n") -> bytes:
    return newline.join([header, *rows, ""]).encode()


@pytest.fixture
def known_batch(technologist, tiny_record):
    """A finished batch with 6 classified images of known predictions and one failed file."""
    return make_known_batch(technologist, tiny_record, [row[:4] for row in KNOWN])


@pytest.fixture
def known_run(technologist, known_batch):
    return create_evaluation(technologist, known_batch, KNOWN_CSV, "labels.csv")


def _copy_model(record, **changes):
    """Another registry entry for the same tiny model file (a second model to re-run or compare with)."""
    skip = {"id", "created_at", *changes}
    fields = {f.name: getattr(record, f.name) for f in ClassifierModel._meta.concrete_fields if f.name not in skip}
    return ClassifierModel.objects.create(**fields, **changes)


def _item(name, classified=True):
    return SimpleNamespace(original_filename=name, prediction=object() if classified else None)


# --- parsing: what is tolerated ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("variant", "data"),
    [
        ("plain", b"filename,class\na.png,neutrophil\nb.png,lymphocyte\n"),
        ("utf-8 BOM", b"\xef\xbb\xbffilename,class\na.png,neutrophil\nb.png,lymphocyte\n"),
        ("semicolons", b"filename;class\na.png;neutrophil\nb.png;lymphocyte\n"),
        ("upper case and spaces", b" FileName , CLASS \na.png, Neutrophil \nb.png,LYMPHOCYTE\n"),
        ("CRLF", b"filename,class\r\na.png,neutrophil\r\nb.png,lymphocyte\r\n"),
        ("blank lines", b"\nfilename,class\n\na.png,neutrophil\n\n\nb.png,lymphocyte\n\n"),
        ("extra column, other order", b"class,note,filename\nneutrophil,x,a.png\nlymphocyte,,b.png\n"),
    ],
)
def test_tolerated_csv_variations_give_the_same_labels(variant, data):
    parsed = parse_label_csv(data, CLASSES)
    assert [(r.filename, r.class_name) for r in parsed.labels] == [("a.png", "neutrophil"), ("b.png", "lymphocyte")]
    assert not (parsed.unknown_classes or parsed.duplicates or parsed.invalid_rows), variant


def test_delimiter_is_detected_from_the_header_even_when_names_contain_commas():
    parsed = parse_label_csv(b"filename;class\nslide,1.png;basophil\n", CLASSES)
    assert parsed.delimiter == ";"
    assert [(r.filename, r.class_name) for r in parsed.labels] == [("slide,1.png", "basophil")]


# --- parsing: what is reported ----------------------------------------------------------------------------------


def test_unknown_classes_are_reported_with_row_number_and_value():
    parsed = parse_label_csv(_csv("a.png,neutrophil", "b.png,platelet", "", "c.png,Blast"), CLASSES)
    assert [r.filename for r in parsed.labels] == ["a.png"]
    assert [(p["row"], p["filename"], p["value"]) for p in parsed.unknown_classes] == [
        (3, "b.png", "platelet"),
        (5, "c.png", "Blast"),  # row numbers are the file's line numbers, blank lines included
    ]


def test_duplicate_with_the_same_class_is_reported_and_counted_once():
    parsed = parse_label_csv(_csv("a.png,neutrophil", "b.png,basophil", "a.png,Neutrophil"), CLASSES)
    assert [(r.filename, r.class_name) for r in parsed.labels] == [("a.png", "neutrophil"), ("b.png", "basophil")]
    (duplicate,) = parsed.duplicates
    assert duplicate["filename"] == "a.png" and duplicate["rows"] == [2, 4] and "counted once" in duplicate["detail"]


def test_duplicate_with_different_classes_is_reported_and_left_out():
    parsed = parse_label_csv(_csv("a.png,neutrophil", "a.png,lymphocyte", "b.png,basophil"), CLASSES)
    assert [r.filename for r in parsed.labels] == ["b.png"]
    (duplicate,) = parsed.duplicates
    assert duplicate["rows"] == [2, 3] and duplicate["values"] == ["neutrophil", "lymphocyte"]
    assert "left out" in duplicate["detail"]


def test_rows_without_a_file_name_or_class_are_reported():
    parsed = parse_label_csv(_csv("a.png,neutrophil", ",basophil", "c.png,"), CLASSES)
    assert [(p["row"], p["detail"]) for p in parsed.invalid_rows] == [
        (3, "no file name on this row"),
        (4, "no class on this row"),
    ]
    assert parsed.unusable_filenames == ["c.png"]  # so c.png is not reported again as an unlabelled image


# --- parsing: what is refused -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ("filename,class\ncafé.png,neutrophil\n".encode("latin-1"), "not UTF-8"),
        ("filename,class\na.png,neutrophil\n".encode("utf-16"), "UTF-16"),
        (b"PK\x03\x04\x14\x00\x06\x00\x08\x00\x00\x00!\x00\xb5U\x93", "not UTF-8"),  # an .xlsx workbook
        (b"file,label\na.png,neutrophil\n", "no header row"),
        (b"a.png,neutrophil\nb.png,basophil\n", "no header row"),
        (b"", "empty"),
        (b"\n\r\n  \n", "empty"),
        (b"\xef\xbb\xbffilename;class\r\n\r\n", "no data rows"),
    ],
)
def test_unusable_files_are_refused_with_a_sentence(data, message):
    with pytest.raises(LabelFileError, match=message):
        parse_label_csv(data, CLASSES)


# --- matching labels to batch images ------------------------------------------------------------------------------


def test_matching_exact_and_by_unique_base_name():
    items = [_item("slide.zip/folder/cell1.png"), _item("slide.zip/other/cell2.png"), _item("plain.png")]
    parsed = parse_label_csv(
        _csv("cell1.png,basophil", "slide.zip/other/cell2.png,monocyte", "plain.png,eosinophil"), CLASSES
    )
    match = match_labels(parsed, items)
    assert [(m.item.original_filename, m.class_name) for m in match.matched] == [
        ("slide.zip/folder/cell1.png", "basophil"),
        ("slide.zip/other/cell2.png", "monocyte"),
        ("plain.png", "eosinophil"),
    ]
    assert not (match.unmatched_rows or match.unlabelled or match.duplicates)


def test_ambiguous_base_name_is_reported_not_guessed():
    items = [_item("a.zip/x/cell.png"), _item("a.zip/y/cell.png")]
    match = match_labels(parse_label_csv(_csv("cell.png,basophil", "a.zip/y/cell.png,monocyte"), CLASSES), items)
    assert [m.item.original_filename for m in match.matched] == ["a.zip/y/cell.png"]
    (row,) = match.unmatched_rows
    assert row["row"] == 2 and "2 images in the batch have this name" in row["detail"]
    assert match.unlabelled == ["a.zip/x/cell.png"]


def test_file_not_in_batch_and_unlabelled_image_are_reported():
    items = [_item("a.png"), _item("b.png"), _item("failed.png", classified=False)]
    match = match_labels(parse_label_csv(_csv("a.png,basophil", "zzz.png,monocyte"), CLASSES), items)
    assert [(r["row"], r["filename"], r["detail"]) for r in match.unmatched_rows] == [
        (3, "zzz.png", "this file is not in the batch")
    ]
    assert match.unlabelled == ["b.png"]  # failed images are not "unlabelled": they have nothing to score


def test_label_for_an_image_the_batch_could_not_classify_is_reported():
    match = match_labels(parse_label_csv(_csv("failed.png,basophil"), CLASSES), [_item("failed.png", False)])
    assert not match.matched and match.not_classified[0]["filename"] == "failed.png"


def test_two_names_for_the_same_image_are_a_duplicate():
    items = [_item("s.zip/cell.png")]
    match = match_labels(parse_label_csv(_csv("cell.png,basophil", "s.zip/cell.png,monocyte"), CLASSES), items)
    assert not match.matched
    assert match.duplicates[0]["rows"] == [2, 3] and "left out" in match.duplicates[0]["detail"]
    assert match.unlabelled == []  # reported as a duplicate, not again as unlabelled


def test_image_with_an_unknown_class_is_not_also_called_unlabelled():
    match = match_labels(
        parse_label_csv(_csv("a.png,blast", "b.png,basophil"), CLASSES), [_item("a.png"), _item("b.png")]
    )
    assert [m.item.original_filename for m in match.matched] == ["b.png"] and match.unlabelled == []


# --- metrics on a hand-computed example -------------------------------------------------------------------------


def test_metrics_match_hand_computed_values(known_run):
    m = known_run.metrics["all"]
    assert known_run.n_labelled == 6 and m["n"] == 6
    assert m["accuracy"] == pytest.approx(4 / 6)
    per = m["per_class"]
    # neutrophil: predicted n1 n2 n3, correct n1 n2 -> P 2/3; true n1 n2 -> R 1; F1 0.8
    assert (per["neutrophil"]["precision"], per["neutrophil"]["recall"]) == (pytest.approx(2 / 3), 1.0)
    assert per["neutrophil"]["f1"] == pytest.approx(0.8)
    # lymphocyte: predicted l1 l2 (l1 right), true n3 l1 (l1 found) -> P = R = F1 = 0.5
    assert [per["lymphocyte"][k] for k in ("precision", "recall", "f1")] == [0.5, 0.5, 0.5]
    assert [per["eosinophil"][k] for k in ("precision", "recall", "f1", "support")] == [1.0, 1.0, 1.0, 1]
    assert [per["monocyte"][k] for k in ("precision", "recall", "f1", "support")] == [0.0, 0.0, 0.0, 1]
    assert m["macro_f1"] == pytest.approx((0 + 1 + 0.5 + 0 + 0.8) / 5)
    assert m["weighted_f1"] == pytest.approx((1 * 1 + 2 * 0.5 + 1 * 0 + 2 * 0.8) / 6)
    # kappa: p_o = 4/6, p_e = (1*1 + 2*2 + 1*0 + 2*3) / 36 = 11/36 -> (24 - 11) / (36 - 11) = 13/25
    assert m["cohen_kappa"] == pytest.approx(13 / 25)
    assert m["confusion_matrix"] == [
        [0, 0, 0, 0, 0],
        [0, 1, 0, 0, 0],
        [0, 0, 1, 0, 1],
        [0, 0, 1, 0, 0],
        [0, 0, 0, 0, 2],
    ]


def test_confident_and_flagged_subsets(known_run):
    confident, flagged = known_run.metrics["confident"], known_run.metrics["flagged"]
    assert confident["n"] == 3 and confident["accuracy"] == 1.0  # n1, n2, l1
    assert flagged["n"] == 3 and flagged["accuracy"] == pytest.approx(1 / 3)  # n3, l2 (outlier), e1
    assert known_run.metrics["misclassified"][0]["filename"] == "n3.png"


def test_an_empty_subset_is_stored_as_n_zero(technologist, known_batch):
    run = create_evaluation(technologist, known_batch, _csv("n1.png,neutrophil", "n2.png,neutrophil"), "two.csv")
    assert run.metrics["flagged"] == {"n": 0}
    assert run.metrics["confident"]["cohen_kappa"] is None  # undefined (one class only), stored as JSON null


def test_run_records_problems_file_and_provenance(technologist, known_batch, tiny_record):
    data = _csv(
        "n1.png,neutrophil", "n1.png,neutrophil", "l1.png,platelet", "ghost.png,basophil", "broken.jpg,monocyte"
    )
    run = create_evaluation(technologist, known_batch, data, "C:\\Users\\me\\labels.csv", threshold=0.9)
    assert run.labels_filename == "labels.csv" and len(run.labels_sha256) == 64
    assert (run.model, run.model_version, run.threshold, run.laboratory) == (
        tiny_record,
        "1",
        0.9,
        known_batch.laboratory,
    )
    p = run.problems
    assert [(d["filename"], d["rows"]) for d in p["duplicates"]] == [("n1.png", [2, 3])]
    assert [(u["row"], u["value"]) for u in p["unknown_classes"]] == [(4, "platelet")]
    assert [r["filename"] for r in p["unmatched_rows"]] == ["ghost.png"]
    assert [r["filename"] for r in p["not_classified"]] == ["broken.jpg"]
    assert p["unlabelled_images"] == ["n2.png", "n3.png", "l2.png", "e1.png"]  # l1 is reported as unknown class
    assert run.n_labelled == 1


def test_refuses_an_unfinished_batch_and_stores_nothing(technologist, known_batch):
    known_batch.status = Batch.Status.RUNNING
    known_batch.save()
    with pytest.raises(Refused, match="not finished"):
        create_evaluation(technologist, known_batch, KNOWN_CSV, "labels.csv")
    assert not EvaluationRun.objects.exists()


def test_refuses_labels_that_match_no_classified_image(technologist, known_batch):
    with pytest.raises(Refused, match=r"No usable label row .* \(1 usable of 1 rows\)"):
        create_evaluation(technologist, known_batch, _csv("other.png,basophil"), "labels.csv")


def test_nothing_half_stored_when_saving_fails(technologist, known_batch, settings, monkeypatch):
    def broken_save(self, *args, **kwargs):
        raise RuntimeError("database went away")

    monkeypatch.setattr(EvaluationRun, "save", broken_save)
    with pytest.raises(RuntimeError):
        create_evaluation(technologist, known_batch, KNOWN_CSV, "labels.csv")
    folder = settings.MEDIA_ROOT / "evaluations"
    assert not folder.exists() or not any(folder.iterdir())


# --- figures --------------------------------------------------------------------------------------------------------


def _png_size(data: bytes) -> tuple[int, int]:
    image = Image.open(io.BytesIO(data))
    image.verify()
    assert image.format == "PNG"
    return image.size


def test_stored_figures_are_valid_pngs_of_sensible_size(known_run):
    for field in (known_run.confusion_png, known_run.roc_png):
        with field.open("rb") as handle:
            width, height = _png_size(handle.read())
        assert 300 <= width <= 2500 and 250 <= height <= 2500


def test_figures_cope_with_classes_without_positives():
    roc = roc_curves_png([0, 0], [[0.9, 0.1], [0.8, 0.2]], ["a", "b"])  # no curve possible
    assert _png_size(roc)[0] > 300
    assert _png_size(confusion_matrix_png([[0, 0], [0, 0]], ["a", "b"]))[0] > 200


# --- pages ------------------------------------------------------------------------------------------------------


def _upload(client, batch, data=KNOWN_CSV, content_type="application/vnd.ms-excel", **extra):
    labels = SimpleUploadedFile("labels.csv", data, content_type=content_type)
    return client.post(reverse("reports:evaluate", args=[batch.uid]), {"labels": labels, **extra})


def test_upload_with_a_windows_content_type_creates_a_run_and_shows_it(tech_client, known_batch):
    response = _upload(tech_client, known_batch, threshold="0.90")
    run = EvaluationRun.objects.get()
    assert response.status_code == 302 and response.url == reverse("reports:evaluation", args=[run.uid])
    assert run.threshold == 0.9
    page = tech_client.get(response.url).text
    assert 'id="accuracy">66.7%<' in page
    assert "0.520" in page  # kappa
    assert reverse("reports:evaluation_figure", args=[run.uid, "confusion"]) in page
    assert 'id="subset-flagged"' in page and "Misclassified images (2)" in page


def test_refused_upload_shows_the_reason_and_stores_nothing(tech_client, known_batch):
    response = _upload(tech_client, known_batch, data=b"name;label\na.png;basophil\n")
    assert response.status_code == 400
    assert "alert-error" in response.text and "no header row" in response.text
    assert not EvaluationRun.objects.exists()


def test_upload_without_a_file_or_with_a_bad_threshold_is_a_400(tech_client, known_batch):
    url = reverse("reports:evaluate", args=[known_batch.uid])
    assert "Choose the CSV file" in tech_client.post(url, {}).text
    assert _upload(tech_client, known_batch, threshold="1.5").status_code == 400


def test_run_page_lists_every_kind_of_problem(tech_client, technologist, known_batch):
    data = _csv(
        "n1.png,neutrophil",
        "n1.png,lymphocyte",
        "l1.png,platelet",
        "ghost.png,basophil",
        "n2.png,",
        "e1.png,eosinophil",
    )
    run = create_evaluation(technologist, known_batch, data, "messy.csv")
    page = tech_client.get(reverse("reports:evaluation", args=[run.uid])).text
    for section in ("unknown_classes", "duplicates", "invalid_rows", "unmatched_rows", "unlabelled_images"):
        assert f'id="problem-{section}"' in page, section
    assert "platelet" in page and "ghost.png" in page and "rows 2, 3" in page


def test_figures_are_served_through_the_lab_scoped_view(tech_client, client, outsider, known_run):
    url = reverse("reports:evaluation_figure", args=[known_run.uid, "roc"])
    response = tech_client.get(url)
    assert response.status_code == 200 and response["Content-Type"] == "image/png"
    assert _png_size(b"".join(response.streaming_content))[0] > 300
    assert tech_client.get(reverse("reports:evaluation_figure", args=[known_run.uid, "other"])).status_code == 404
    client.force_login(outsider)
    assert client.get(url).status_code == 404


def test_metrics_csv_and_json_downloads_contain_the_accuracy(tech_client, known_run):
    response = tech_client.get(reverse("reports:evaluation_csv", args=[known_run.uid]))
    assert "attachment" in response["Content-Disposition"]
    rows = list(csv.reader(io.StringIO(response.content.decode())))
    assert rows[0] == ["subset", "class", "metric", "value"]
    assert ["all", "", "accuracy", "0.6667"] in rows and ["confident", "", "accuracy", "1.0000"] in rows
    assert ["all", "neutrophil", "precision", "0.6667"] in rows
    response = tech_client.get(reverse("reports:evaluation_json", args=[known_run.uid]))
    assert "attachment" in response["Content-Disposition"]
    payload = json.loads(response.content)
    assert payload["metrics"]["all"]["accuracy"] == pytest.approx(4 / 6) and payload["n_labelled"] == 6


def test_evaluation_list_is_newest_first_with_an_empty_state(tech_client, technologist, known_batch):
    assert "No evaluation runs yet" in tech_client.get(reverse("reports:evaluations")).text
    create_evaluation(technologist, known_batch, KNOWN_CSV, "first.csv")
    create_evaluation(technologist, known_batch, _csv("n1.png,neutrophil"), "second.csv")
    page = tech_client.get(reverse("reports:evaluations")).text
    assert page.index("second.csv") < page.index("first.csv")


def test_compare_page_shows_both_runs_side_by_side(tech_client, technologist, known_batch, tiny_record):
    run_a = create_evaluation(technologist, known_batch, KNOWN_CSV, "labels.csv")
    other = _copy_model(tiny_record, name="Other CNN")
    known_batch.model = other
    known_batch.save()
    run_b = create_evaluation(technologist, known_batch, _csv("n1.png,neutrophil", "l1.png,lymphocyte"), "partial.csv")
    page = tech_client.get(reverse("reports:evaluation_compare"), {"a": run_a.uid, "b": run_b.uid}).text
    assert "Tiny CNN v1" in page and "Other CNN v1" in page
    assert "0.667" in page and "1.000" in page and "+0.333" in page  # accuracy A, B and B − A
    assert "different label files" in page
    assert 'id="compare-f1"' in page
    assert "Run A" in tech_client.get(reverse("reports:evaluation_compare")).text  # the picker


def test_batch_page_partials_render(tech_client, technologist, known_batch):
    """The include templates the batch page can use: the upload form, the runs list and the re-run form."""
    from django.template.loader import render_to_string

    create_evaluation(technologist, known_batch, KNOWN_CSV, "labels.csv")
    request = tech_client.get(reverse("reports:batch", args=[known_batch.uid])).wsgi_request
    html = render_to_string("reports/_evaluate_form.html", {"batch": known_batch}, request=request)
    assert reverse("reports:evaluate", args=[known_batch.uid]) in html and "labels.csv" in html
    html = render_to_string("reports/_rerun_form.html", {"batch": known_batch}, request=request)
    assert "No other model is available" in html


# --- lab scoping and permissions --------------------------------------------------------------------------------


def test_another_lab_gets_404_everywhere(client, outsider, known_run, known_batch, tiny_record):
    client.force_login(outsider)
    uid = known_run.uid
    for name in ("reports:evaluation", "reports:evaluation_csv", "reports:evaluation_json"):
        assert client.get(reverse(name, args=[uid])).status_code == 404, name
    assert client.get(reverse("reports:evaluation_compare"), {"a": uid, "b": uid}).status_code == 404
    labels = SimpleUploadedFile("labels.csv", KNOWN_CSV, content_type="text/csv")
    assert client.post(reverse("reports:evaluate", args=[known_batch.uid]), {"labels": labels}).status_code == 404
    assert client.post(reverse("reports:rerun", args=[known_batch.uid]), {"model": tiny_record.pk}).status_code == 404
    assert "No evaluation runs yet" in client.get(reverse("reports:evaluations")).text
    assert EvaluationRun.objects.count() == 1 and Batch.objects.count() == 1


def test_rerun_with_another_labs_model_is_a_404(tech_client, known_batch, tiny_record, lab_b):
    private = _copy_model(tiny_record, name="Lab B private", laboratory=lab_b)
    url = reverse("reports:rerun", args=[known_batch.uid])
    assert tech_client.post(url, {"model": private.pk}).status_code == 404
    assert tech_client.post(url, {"model": "not-a-number"}).status_code == 404
    assert Batch.objects.count() == 1


def test_posting_needs_the_classify_permission(client, lab_a, known_batch, tiny_record):
    viewer = User.objects.create_user(username="viewer", password="a-long-test-password", laboratory=lab_a)
    client.force_login(viewer)
    labels = SimpleUploadedFile("labels.csv", KNOWN_CSV, content_type="text/csv")
    assert client.post(reverse("reports:evaluate", args=[known_batch.uid]), {"labels": labels}).status_code == 403
    assert client.post(reverse("reports:rerun", args=[known_batch.uid]), {"model": tiny_record.pk}).status_code == 403


def test_rerun_form_redirects_to_the_new_batch(
    tech_client, known_batch, tiny_record, django_capture_on_commit_callbacks
):
    other = _copy_model(tiny_record, name="Other CNN")
    known_batch.items.filter(status=BatchItem.Status.DONE).update(image="batches/cell.png")
    with django_capture_on_commit_callbacks() as callbacks:
        response = tech_client.post(reverse("reports:rerun", args=[known_batch.uid]), {"model": other.pk})
    new_batch = Batch.objects.exclude(pk=known_batch.pk).get()
    assert response.status_code == 302 and response.url == reverse("reports:batch", args=[new_batch.uid])
    assert new_batch.name == "Known slide · Other CNN" and new_batch.items.count() == 7
    assert len(callbacks) == 1  # the enqueue, once committed
    assert new_batch.status == Batch.Status.QUEUED and new_batch.items.filter(status="pending").count() == 6
    assert new_batch.items.get(original_filename="broken.jpg").status == BatchItem.Status.FAILED


def test_rerun_refuses_the_batch_own_model(tech_client, known_batch, tiny_record):
    response = tech_client.post(
        reverse("reports:rerun", args=[known_batch.uid]), {"model": tiny_record.pk}, follow=True
    )
    assert "already classified with" in response.text and Batch.objects.count() == 1


# --- re-running a batch with another model (real worker) ------------------------------------------------------------


@pytest.mark.django_db(transaction=True)
def test_a_batch_still_waiting_for_its_worker_cannot_be_rerun(technologist, tiny_record):
    waiting = submit_batch(technologist, [NamedBytes("cell.png", image_bytes())], tiny_record, name="Waiting")
    other = _copy_model(tiny_record, name="Tiny CNN (second opinion)")
    with pytest.raises(Refused, match="still being classified"):  # its images are not in files of their own yet
        rerun_batch(technologist, waiting, other)
    assert Batch.objects.count() == 1


@pytest.mark.django_db(transaction=True)
def test_rerun_uses_the_same_files_and_the_worker_classifies_every_image(technologist, tiny_record, monkeypatch):
    entries = [NamedBytes(f"cell{i}.png", image_bytes(color=(60 * i, 100, 200))) for i in range(3)]
    original = submit_batch(technologist, [*entries, NamedBytes("junk.jpg", b"not an image")], tiny_record, name="S1")
    call_command("run_worker", "--batch")
    original.refresh_from_db()
    assert original.status == Batch.Status.DONE
    other = _copy_model(tiny_record, name="Tiny CNN (second opinion)")

    enqueued = []
    real_enqueue = services.submission.enqueue
    monkeypatch.setattr(services.submission, "enqueue", lambda b: (enqueued.append(b.pk), real_enqueue(b)))
    rerun = rerun_batch(technologist, original, other)
    assert enqueued == [rerun.pk]  # queued once the transaction committed
    assert (rerun.laboratory_id, rerun.model, rerun.status) == (original.laboratory_id, other, Batch.Status.QUEUED)
    old_items, new_items = list(original.items.order_by("position")), list(rerun.items.order_by("position"))
    assert [i.image.name for i in new_items] == [i.image.name for i in old_items]
    assert [i.original_filename for i in new_items] == [i.original_filename for i in old_items]
    junk = rerun.items.get(original_filename="junk.jpg")
    assert junk.status == BatchItem.Status.FAILED and junk.error == old_items[-1].error

    call_command("run_worker", "--batch")
    rerun.refresh_from_db()
    assert rerun.status == Batch.Status.DONE
    done = rerun.items.filter(status=BatchItem.Status.DONE, prediction__isnull=False).select_related("prediction")
    assert done.count() == 3
    assert all(item.prediction.model == other and item.prediction.image.name == item.image.name for item in done)
    assert original.items.filter(prediction__isnull=False).count() == 3  # the first run is untouched


def test_anonymous_visitors_are_sent_to_log_in(client, known_run):
    for url in (reverse("reports:evaluations"), reverse("reports:evaluation", args=[known_run.uid])):
        response = client.get(url)
        assert response.status_code == 302 and response["Location"].startswith(reverse("login"))
