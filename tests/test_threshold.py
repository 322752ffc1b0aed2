import csv
import io

import pytest
from django.urls import reverse


def test_default_threshold_is_085(technologist):
    assert technologist.review_threshold == 0.85


def test_slider_value_is_remembered_per_user(tech_client, technologist):
    response = tech_client.post(
        reverse("classifier:threshold"), {"threshold": "0.93"}, headers={"Accept": "application/json"}
    )
    assert response.status_code == 200 and response.json() == {"threshold": 0.93}
    technologist.refresh_from_db()
    assert technologist.review_threshold == 0.93


@pytest.mark.parametrize("value", ["0.49", "1.0", "abc", ""])
def test_threshold_outside_range_is_refused(tech_client, technologist, value):
    response = tech_client.post(
        reverse("classifier:threshold"), {"threshold": value}, headers={"Accept": "application/json"}
    )
    assert response.status_code == 400
    technologist.refresh_from_db()
    assert technologist.review_threshold == 0.85


def test_plain_form_post_redirects_back_safely(tech_client):
    response = tech_client.post(reverse("classifier:threshold"), {"threshold": "0.9", "next": "https://evil.example/"})
    assert response.status_code == 302 and response["Location"] == reverse("classifier:classify")


def test_result_page_flags_review_from_the_users_threshold(tech_client, technologist, prediction):
    url = reverse("classifier:prediction", args=[prediction.uid])
    technologist.review_threshold = 0.99
    technologist.save()
    warning_hidden = 'id="review-warning" role="alert" hidden'
    assert warning_hidden not in tech_client.get(url).text  # confidence of an untrained model is far below 0.99
    prediction.confidence = 0.995
    prediction.save()
    assert warning_hidden in tech_client.get(url).text


def test_needs_review_rule(prediction):
    prediction.confidence, prediction.is_outlier = 0.9, False
    assert not prediction.needs_review(0.85) and prediction.needs_review(0.95)
    prediction.is_outlier = True
    assert prediction.needs_review(0.5)


# --- a threshold in a query is a finite number in the bounds, or the request is refused (pages and API alike) ----

NOT_A_THRESHOLD = ["nan", "NaN", "inf", "-inf", "1e999", "abc", "0.3", "1.5"]


@pytest.fixture
def report_batch(technologist, tiny_record):
    from tests.conftest import make_known_batch

    return make_known_batch(technologist, tiny_record, [("a.png", 4, 0.60, False), ("b.png", 2, 0.99, False)])


@pytest.mark.parametrize("value", NOT_A_THRESHOLD)
@pytest.mark.parametrize("page", ["reports:batch", "reports:batch_csv", "reports:batch_summary_csv"])
def test_report_pages_refuse_a_threshold_that_is_not_a_number_in_range(tech_client, report_batch, page, value):
    response = tech_client.get(reverse(page, args=[report_batch.uid]), {"threshold": value})
    assert response.status_code == 400
    assert "threshold must be a number between 0.50 and 0.99" in response.text


def test_report_csv_flags_at_a_valid_threshold_and_at_the_users_own_without_one(tech_client, report_batch):
    def flags(**params) -> list[str]:
        response = tech_client.get(reverse("reports:batch_csv", args=[report_batch.uid]), params)
        assert response.status_code == 200
        rows = list(csv.DictReader(io.StringIO(response.content.decode())))
        return [row["needs_review"] for row in rows]

    assert flags() == ["yes", "no"]  # the user's 0.85
    assert flags(threshold="0.5") == ["no", "no"]
    assert flags(threshold="0.99") == ["yes", "no"]


@pytest.mark.parametrize("value", ["nan", "inf", "-Infinity", "1.5"])
def test_api_refuses_a_threshold_that_is_not_a_number_in_range(technologist, report_batch, value):
    from rest_framework.test import APIClient

    from accounts.models import ApiToken

    _token, key = ApiToken.issue(technologist, "LIS")
    api = APIClient()
    api.credentials(HTTP_AUTHORIZATION=f"Token {key}")
    for name in ("api:batch-detail", "api:batch-report", "api:batch-summary"):
        response = api.get(reverse(name, args=[report_batch.uid]), {"threshold": value})
        assert response.status_code == 400, (name, response.content)
        assert response.json()["error"]["code"] == "invalid"
    response = api.post(reverse("api:batch-list"), {"urls": ["https://x.org/a.png"], "threshold": value})
    assert response.status_code == 400 and "threshold" in response.json()["error"]["details"]
