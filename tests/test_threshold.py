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
