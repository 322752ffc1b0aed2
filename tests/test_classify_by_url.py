from django.urls import reverse

from classifier.models import Prediction


def _post(client, record, url):
    return client.post(reverse("classifier:classify_url"), {"url": url, "model": record.pk})


def test_loopback_url_is_refused_with_a_message(tech_client, tiny_record, server):
    # even with 'localhost' allowed by name, the literal loopback address is refused
    response = _post(tech_client, tiny_record, f"http://127.0.0.1:{server}/cell.png")
    assert response.status_code == 400
    assert "loopback, not a public internet address" in response.text
    assert Prediction.objects.count() == 0


def test_allowlisted_lab_host_is_fetched_and_classified(tech_client, tiny_record, server):
    response = _post(tech_client, tiny_record, f"http://localhost:{server}/cell.png")
    prediction = Prediction.objects.get()
    assert response.status_code == 302 and prediction.original_filename == "cell.png"
    assert (prediction.width, prediction.height) == (80, 80)


def test_redirect_to_metadata_address_is_refused_even_from_an_allowed_host(tech_client, tiny_record, server):
    response = _post(tech_client, tiny_record, f"http://localhost:{server}/to-metadata")
    assert response.status_code == 400 and "169.254.169.254" in response.text and "link-local" in response.text
    assert Prediction.objects.count() == 0


def test_body_that_is_not_an_image_is_refused(tech_client, tiny_record, server):
    response = _post(tech_client, tiny_record, f"http://localhost:{server}/page.html")
    assert response.status_code == 400 and "not a readable image" in response.text
    assert Prediction.objects.count() == 0


def test_non_http_scheme_is_refused(tech_client, tiny_record):
    response = _post(tech_client, tiny_record, "ftp://example.org/cell.png")
    assert response.status_code == 400
    assert Prediction.objects.count() == 0
