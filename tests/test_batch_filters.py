"""The batch list and the history filter by status, review state (to review / signed / unsigned), date range and
accession, and show the cells still to review, counted in the list's own query (no query per row)."""

from datetime import timedelta

import pytest
from django.db import connection
from django.test.utils import CaptureQueriesContext
from django.urls import reverse
from django.utils import timezone

from reports.models import Batch, CellVerification, ReportVersion
from tests.conftest import make_known_batch

FLAGGED = [("a.png", 4, 0.99, False), ("b.png", 2, 0.60, False), ("c.png", 4, 0.97, True)]
CLEAN = [("a.png", 4, 0.99, False), ("b.png", 2, 0.98, False)]


@pytest.fixture
def slides(technologist, tiny_record):
    flagged = make_known_batch(technologist, tiny_record, FLAGGED, name="Flagged slide")
    flagged.external_id = "ACC-100"
    flagged.save()
    clean = make_known_batch(technologist, tiny_record, CLEAN, name="Clean slide")
    clean.external_id = "ACC-200"
    clean.created_at = timezone.now() - timedelta(days=10)
    clean.save()
    now = timezone.now()
    ReportVersion.objects.create(
        batch=clean, number=1, opened_by=technologist, opened_at=now, signed_by=technologist, signed_at=now
    )
    queued = Batch.objects.create(
        laboratory=technologist.laboratory, user=technologist, name="Queued slide", model=tiny_record
    )
    return {"flagged": flagged, "clean": clean, "queued": queued}


def _names(client, **params):
    page = client.get(reverse("reports:batches"), params)
    assert page.status_code == 200
    return {name for name in ("Flagged slide", "Clean slide", "Queued slide") if name in page.text}


def test_batch_list_filters(tech_client, slides):
    assert _names(tech_client) == {"Flagged slide", "Clean slide", "Queued slide"}
    assert _names(tech_client, status="queued") == {"Queued slide"}
    assert _names(tech_client, review="to_review") == {"Flagged slide"}
    assert _names(tech_client, review="signed") == {"Clean slide"}
    assert _names(tech_client, review="unsigned") == {"Flagged slide", "Queued slide"}
    assert _names(tech_client, accession="acc-2") == {"Clean slide"}
    today = timezone.localdate()
    assert _names(tech_client, created_after=today.isoformat()) == {"Flagged slide", "Queued slide"}
    old = (today - timedelta(days=10)).isoformat()
    assert _names(tech_client, created_after=old, created_before=old) == {"Clean slide"}
    assert "No batch matches" in tech_client.get(reverse("reports:batches"), {"accession": "nothing"}).text


def test_a_bad_filter_shows_its_error_and_filters_nothing(tech_client, slides):
    page = tech_client.get(reverse("reports:batches"), {"created_after": "not a date", "status": "sideways"}).text
    assert "Enter a valid date" in page and "Flagged slide" in page


def test_the_list_shows_cells_to_review_without_a_query_per_row(tech_client, slides, technologist, tiny_record):
    page = tech_client.get(reverse("reports:batches")).text
    assert '<td class="num to-review"><a href="' + reverse("reports:review", args=[slides["flagged"].uid]) in page
    CellVerification.objects.create(
        item=slides["flagged"].items.get(original_filename="b.png"),
        verified_class="lymphocyte",
        verified_by=technologist,
        verified_at=timezone.now(),
    )
    batch = Batch.objects.filter(pk=slides["flagged"].pk)
    from reports.review import with_review_counts

    assert with_review_counts(batch).get().n_to_review == 1  # the outlier is left
    for n in range(5):
        make_known_batch(technologist, tiny_record, FLAGGED, name=f"More {n}")
    with CaptureQueriesContext(connection) as few:
        tech_client.get(reverse("reports:batches"))
    for n in range(10):
        make_known_batch(technologist, tiny_record, FLAGGED, name=f"Even more {n}")
    with CaptureQueriesContext(connection) as many:
        tech_client.get(reverse("reports:batches"))
    assert len(many) == len(few)


def test_pager_links_keep_the_filters(tech_client, technologist, tiny_record):
    for n in range(21):
        make_known_batch(technologist, tiny_record, FLAGGED, name=f"Slide {n}")
    page = tech_client.get(reverse("reports:batches"), {"review": "to_review"}).text
    assert 'href="?review=to_review&amp;page=2"' in page


def test_history_filters_and_counts_cells_to_review(tech_client, slides):
    page = tech_client.get(reverse("classifier:history")).text
    assert 'id="history-to-review">2 cells of slides still to review' in page
    flagged = tech_client.get(reverse("classifier:history"), {"review": "to_review"}).text
    assert flagged.count('class="flag to-review"') == 2
    signed = tech_client.get(reverse("classifier:history"), {"review": "signed"}).text
    assert signed.count("<tr>") - 1 == 2  # the clean slide's two cells (minus the header row)
    by_accession = tech_client.get(reverse("classifier:history"), {"accession": "ACC-100"}).text
    assert by_accession.count("<tr>") - 1 == 3
    confident = tech_client.get(reverse("classifier:history"), {"status": "clear"}).text
    assert confident.count("<tr>") - 1 == 3  # a, a, b of the clean slide (0.99, 0.99, 0.98)


def test_another_labs_batches_never_show(client, outsider, slides):
    client.force_login(outsider)
    assert _names(client) == set()
    assert _names(client, review="signed") == set()
