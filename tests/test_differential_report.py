import csv
import io

import pytest
from django.urls import reverse

from reports.differential import REPORT_COLUMNS, REVIEW_COLUMNS, build_differential, excel_safe
from reports.models import Batch
from tests.conftest import make_known_batch

CLASSES = ["basophil", "eosinophil", "lymphocyte", "monocyte", "neutrophil"]


@pytest.fixture
def known_batch(technologist, tiny_record):
    """6 classified images (3 neutrophil, 2 lymphocyte, 1 eosinophil) and one failed file."""
    rows = [
        ("n1.png", 4, 0.99, False),
        ("n2.png", 4, 0.90, False),
        ('=HYPERLINK("http://x").png', 4, 0.80, False),  # below 0.85: needs review
        ("l1.png", 2, 0.95, False),
        ("l2.png", 2, 0.97, True),  # confident but an outlier: needs review
        ("e1.png", 1, 0.60, False),  # needs review
    ]
    return make_known_batch(
        technologist, tiny_record, rows, failed_error="broken.jpg: the image is damaged or truncated."
    )


def test_tallies_and_percentages_on_a_known_set(known_batch):
    report = build_differential(known_batch, 0.85)
    tallies = {t.name: (t.count, round(t.percent, 4)) for t in report.tallies}
    assert tallies == {
        "basophil": (0, 0.0),
        "eosinophil": (1, 0.1667),
        "lymphocyte": (2, 0.3333),
        "monocyte": (0, 0.0),
        "neutrophil": (3, 0.5),
    }
    assert report.classified == 6 and report.total == 7
    assert report.needs_review == 3
    assert [i.original_filename for i in report.failed] == ["broken.jpg"]
    assert report.total_ms == pytest.approx(10 + 11 + 12 + 13 + 14 + 15)
    assert report.mean_ms == pytest.approx(12.5)


def test_review_tally_follows_the_threshold_and_flagged_images_stay(known_batch):
    assert build_differential(known_batch, 0.50).needs_review == 1  # only the outlier
    strict = build_differential(known_batch, 0.99)
    assert strict.needs_review == 5  # all but the 0.99 one
    assert sum(t.count for t in strict.tallies) == 6  # flagged images are never dropped from the tallies


def _csv(client, name, batch, **params):
    response = client.get(reverse(name, args=[batch.uid]), params)
    assert response.status_code == 200
    assert response["Content-Type"] == "text/csv; charset=utf-8"
    assert "attachment" in response["Content-Disposition"]
    return list(csv.reader(io.StringIO(response.content.decode("utf-8"))))


def test_csv_has_the_exact_header_and_one_row_per_classified_image(tech_client, known_batch):
    rows = _csv(tech_client, "reports:batch_csv", known_batch)
    assert rows[0] == REPORT_COLUMNS + [f"prob_{c}" for c in CLASSES] + REVIEW_COLUMNS
    assert REVIEW_COLUMNS == [
        "verified_class",
        "verified_by",
        "verified_at",
        "model_version",
        "is_outlier",
        "model_sha256",
    ]
    assert rows[0][:6] == ["filename", "predicted_class", "confidence", "needs_review", "timestamp", "processing_ms"]
    assert len(rows) == 7
    by_name = {r[0]: r for r in rows[1:]}
    assert by_name["n1.png"][1:4] == ["neutrophil", "0.9900", "no"]
    assert by_name["e1.png"][3] == "yes" and by_name["l2.png"][3] == "yes"
    assert float(by_name["n1.png"][6 + 4]) == pytest.approx(0.99)
    assert by_name["n1.png"][-1] == known_batch.model.sha256 and len(known_batch.model.sha256) == 64


def test_csv_neutralises_formulas_in_file_names(tech_client, known_batch):
    rows = _csv(tech_client, "reports:batch_csv", known_batch)
    names = [r[0] for r in rows[1:]]
    assert '\'=HYPERLINK("http://x").png' in names
    assert not any(n.startswith(("=", "+", "-", "@")) for n in names)


@pytest.mark.parametrize("value", ["=1+1", "+1", "-1", "@SUM(A1)", "\tx"])
def test_excel_safe_prefixes_formula_starters(value):
    assert excel_safe(value) == "'" + value


def test_csv_uses_the_threshold_asked_for(tech_client, known_batch):
    rows = _csv(tech_client, "reports:batch_csv", known_batch, threshold="0.5")
    assert sum(r[3] == "yes" for r in rows[1:]) == 1


def test_summary_csv(tech_client, known_batch):
    rows = _csv(tech_client, "reports:batch_summary_csv", known_batch)
    assert rows[0][:3] == ["class", "count", "percent"]
    by_name = {row[0]: row[1:] for row in rows[1:]}
    assert by_name["neutrophil"][:4] == ["3", "50.0", "N", "40-60"]
    assert by_name["lymphocyte"][:4] == ["2", "33.3", "N", "20-40"]
    assert by_name["needs_review"][:2] == ["3", "50.0"] and by_name["failed"][0] == "1"


def test_report_page_shows_tallies_failures_and_rows(tech_client, known_batch):
    page = tech_client.get(reverse("reports:batch", args=[known_batch.uid])).text
    assert "broken.jpg" in page and "damaged or truncated" in page
    assert 'id="review-count">3<' in page
    assert page.count('class="needs-review"') == 3


def test_batch_list_is_newest_first_and_empty_state(tech_client, known_batch, technologist, tiny_record):
    newer = Batch.objects.create(
        laboratory=technologist.laboratory, user=technologist, name="Newer slide", model=tiny_record
    )
    page = tech_client.get(reverse("reports:batches")).text
    assert page.index("Newer slide") < page.index("Known slide")
    Batch.objects.all().delete()
    assert "No batches yet" in tech_client.get(reverse("reports:batches")).text
    assert newer
