import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from django.urls import reverse

from classifier.models import Prediction
from tests.conftest import image_bytes

PNG = image_bytes(size=(80, 80))


class Handler(BaseHTTPRequestHandler):
    def do_GET(self):
        if self.path == "/cell.png":
            self.send_response(200)
            self.send_header("Content-Type", "image/png")
            self.send_header("Content-Length", str(len(PNG)))
            self.end_headers()
            self.wfile.write(PNG)
        elif self.path == "/to-metadata":
            self.send_response(302)
            self.send_header("Location", "http://169.254.169.254/latest/meta-data/")
            self.end_headers()
        else:
            self.send_response(200)
            self.end_headers()
            self.wfile.write(b"<html>not an image</html>")

    def log_message(self, *args):
        pass


@pytest.fixture
def server():
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield httpd.server_address[1]
    httpd.shutdown()


def _post(client, record, url):
    return client.post(reverse("classifier:classify_url"), {"url": url, "model": record.pk})


def test_loopback_url_is_refused_with_a_message(tech_client, tiny_record, server):
    response = _post(tech_client, tiny_record, f"http://127.0.0.1:{server}/cell.png")
    assert response.status_code == 400
    assert "loopback, not a public internet address" in response.text
    assert Prediction.objects.count() == 0


def test_allowlisted_lab_host_is_fetched_and_classified(tech_client, tiny_record, server, settings):
    settings.WBC_URL_ALLOWED_PRIVATE_HOSTS = {"localhost"}
    response = _post(tech_client, tiny_record, f"http://localhost:{server}/cell.png")
    prediction = Prediction.objects.get()
    assert response.status_code == 302 and prediction.original_filename == "cell.png"
    assert (prediction.width, prediction.height) == (80, 80)


def test_redirect_to_metadata_address_is_refused_even_from_an_allowed_host(tech_client, tiny_record, server, settings):
    settings.WBC_URL_ALLOWED_PRIVATE_HOSTS = {"localhost"}
    response = _post(tech_client, tiny_record, f"http://localhost:{server}/to-metadata")
    assert response.status_code == 400 and "169.254.169.254" in response.text and "link-local" in response.text
    assert Prediction.objects.count() == 0


def test_body_that_is_not_an_image_is_refused(tech_client, tiny_record, server, settings):
    settings.WBC_URL_ALLOWED_PRIVATE_HOSTS = {"localhost"}
    response = _post(tech_client, tiny_record, f"http://localhost:{server}/page.html")
    assert response.status_code == 400 and "not a readable image" in response.text
    assert Prediction.objects.count() == 0


def test_non_http_scheme_is_refused(tech_client, tiny_record):
    response = _post(tech_client, tiny_record, "ftp://example.org/cell.png")
    assert response.status_code == 400
    assert Prediction.objects.count() == 0
