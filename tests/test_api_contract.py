"""Contract test: schemathesis fuzzes the live OpenAPI schema (/api/v1/schema/) against the WSGI app.

Every operation of the schema is exercised, GETs and POSTs alike, with a valid token: the schema's own
examples, then generated cases (valid and invalid: ``mode = all``), at most ``MAX_EXAMPLES`` per operation,
derandomized (the same cases on every run). It must find no 5xx, no undocumented status code, no response
whose body, content type or headers break the schema, and no endpoint that ignores authentication.

What keeps it fast and hermetic: the URL fetcher is replaced (no network; one known host serves a real
image, every other URL is refused the way the fetcher refuses), the model is the tiny real Keras model, the
and throttling is off. Uploads are fuzzed too: random bytes are refused by
content before any model runs. Stateful (link-following) and coverage phases are off to bound the run time.
"""

from __future__ import annotations

import time
from collections import Counter

import hypothesis
import hypothesis.errors
import pytest
import schemathesis
from django.core.cache import caches
from django.core.handlers.wsgi import WSGIHandler
from django.core.signals import request_finished, request_started
from django.db import close_old_connections
from hypothesis import strategies as st
from schemathesis import GenerationMode
from schemathesis.config import SchemathesisConfig

from accounts.models import ApiToken
from classifier import api as api_module
from classifier.fetch import UrlRefused
from reports.services import create_evaluation
from tests.conftest import image_bytes, make_known_batch

MAX_EXAMPLES = 10  # per operation and mode: the suite's time is measured by pytest --durations, not asserted
KNOWN_IMAGE_HOST = "https://images.example.org/"


def _fake_fetch(url: str, **_limits) -> tuple[str, bytes]:
    if isinstance(url, str) and url.startswith(KNOWN_IMAGE_HOST):
        return "cell.png", image_bytes()
    raise UrlRefused(str(url), "could not resolve the host name (no network in the contract test).")


@pytest.fixture
def hermetic_api(settings, monkeypatch):
    """No network (fuzzed URLs must never leave this machine), no throttling.

    The WSGI app shares the test's database transaction."""
    monkeypatch.setattr(api_module, "fetch_url", _fake_fetch)  # a batch's URLs are fetched by the worker, not here
    settings.WBC_API_RATE = ""
    settings.WBC_API_SUBMIT_RATE = ""
    settings.CACHES = {
        "default": {"BACKEND": "django.core.cache.backends.locmem.LocMemCache"},
        "api_throttle": {"BACKEND": "django.core.cache.backends.locmem.LocMemCache", "LOCATION": "contract"},
    }
    caches["api_throttle"].clear()
    # As Django's test client does: requests must not close the connection that holds the test transaction.
    request_started.disconnect(close_old_connections)
    request_finished.disconnect(close_old_connections)
    yield
    request_started.connect(close_old_connections)
    request_finished.connect(close_old_connections)


@pytest.fixture
def known_objects(hermetic_api, technologist, tiny_record, prediction):
    """Real objects, so that generated path parameters sometimes hit something that exists."""
    batch = make_known_batch(technologist, tiny_record, [("n1.png", 4, 0.99, False), ("l1.png", 2, 0.95, False)])
    run = create_evaluation(technologist, batch, b"filename,class\nn1.png,neutrophil\n", "labels.csv")
    return {
        "/api/v1/predictions/": str(prediction.uid),
        "/api/v1/batches/": str(batch.uid),
        "/api/v1/evaluations/": str(run.uid),
        "/api/v1/models/": tiny_record.pk,
    }


@pytest.fixture
def auth_headers(technologist) -> dict[str, str]:
    _token, key = ApiToken.issue(technologist, "contract test")
    return {"Authorization": f"Token {key}"}


@pytest.fixture
def api_schema(db, hermetic_api, auth_headers, known_objects):
    config = SchemathesisConfig.from_dict(
        {
            "generation": {"mode": "all", "max-examples": MAX_EXAMPLES, "deterministic": True},
            "phases": {
                "examples": {"enabled": True},
                "fuzzing": {"enabled": True},
                "coverage": {"enabled": False},
                "stateful": {"enabled": False},
            },
            "checks": {
                "not_a_server_error": {"enabled": True},
                "status_code_conformance": {"enabled": True},
                "content_type_conformance": {"enabled": True},
                "response_schema_conformance": {"enabled": True},
                "response_headers_conformance": {"enabled": True},
                "ignored_auth": {"enabled": True},
                # A valid-looking case may still be refused for reasons outside the schema (an unknown id is a
                # 404, an unreachable URL a 400), so "positive data is accepted" does not apply.
                "positive_data_acceptance": {"enabled": False},
                # Stateful checks: off with the stateful phase.
                "use_after_free": {"enabled": False},
                "ensure_resource_availability": {"enabled": False},
            },
        }
    )
    schema = schemathesis.openapi.from_wsgi("/api/v1/schema/", WSGIHandler(), config=config, headers=auth_headers)

    @schema.hook
    def before_generate_path_parameters(context, strategy):
        """Half the time, use an id that exists (so the 200 responses are checked too, not only 404s)."""
        path = context.operation.path
        for prefix, known in known_objects.items():
            if path.startswith(prefix) and ("{uid}" in path or "{id}" in path):
                return st.one_of(strategy, st.just({"uid" if "{uid}" in path else "id": known}))
        return strategy

    @schema.hook
    def after_call(context, case, response):
        seen.setdefault(case.operation.label, Counter())[response.status_code] += 1

    seen: dict[str, Counter] = {}
    schema.seen_statuses = seen
    return schema


MODES = (GenerationMode.POSITIVE, GenerationMode.NEGATIVE)


def _explicit_cases(schema, known_objects) -> list:
    """Hand-written valid requests, so the success responses of the write operations are checked too."""
    predictions, batches = schema["/api/v1/predictions/"]["POST"], schema["/api/v1/batches/"]["POST"]
    evaluations = schema["/api/v1/batches/{uid}/evaluations/"]["POST"]
    labels = b"filename,class\nn1.png,neutrophil\nl1.png,lymphocyte\n"
    return [
        predictions.Case(body={"url": KNOWN_IMAGE_HOST + "cell.png"}, media_type="application/json"),
        predictions.Case(body={"file": image_bytes(), "threshold": 0.7}, media_type="multipart/form-data"),
        batches.Case(
            body={"urls": [KNOWN_IMAGE_HOST + "a.png"], "external_id": "ACC-1"}, media_type="application/json"
        ),
        batches.Case(body={"files": [image_bytes()], "external_id": "ACC-2"}, media_type="multipart/form-data"),
        evaluations.Case(
            path_parameters={"uid": known_objects["/api/v1/batches/"]},
            body={"labels": labels},
            media_type="multipart/form-data",
        ),
    ]


def test_every_operation_conforms_to_the_schema(api_schema, auth_headers, known_objects):
    started = time.monotonic()
    failures: list[str] = []
    operations = [result.ok() for result in api_schema.get_all_operations()]
    assert len(operations) >= 15  # every endpoint is in the schema and fuzzed, none excluded

    for case in _explicit_cases(api_schema, known_objects):
        response = case.call_and_validate(headers=auth_headers)
        assert response.status_code in (200, 201, 202), (case.operation.label, response.status_code, response.text)

    for operation in operations:
        for mode in MODES:

            @hypothesis.settings(
                max_examples=MAX_EXAMPLES,
                derandomize=True,  # the same cases on every run
                deadline=None,
                database=None,
                suppress_health_check=list(hypothesis.HealthCheck),
                phases=[hypothesis.Phase.explicit, hypothesis.Phase.generate],
            )
            @hypothesis.given(case=operation.as_strategy(generation_mode=mode))
            def run(case):
                case.call_and_validate(headers=auth_headers)

            try:
                run()
            except hypothesis.errors.Unsatisfiable:
                continue  # nothing negative to generate (an operation without parameters)
            except Exception as exc:
                failures.append(f"{operation.label} ({mode.value}):\n{exc}")
    elapsed = time.monotonic() - started
    assert not failures, "\n\n".join(failures)
    seen = api_schema.seen_statuses
    print(f"\n{sum(sum(c.values()) for c in seen.values())} requests in {elapsed:.1f} s")
    for label, statuses in sorted(seen.items()):
        print(f"  {label}: {dict(sorted(statuses.items()))}")
    assert {label for label in seen} >= {op.label for op in operations}  # every operation was called
    # Known ids were used too, so successful responses were validated, not only 404s.
    for label in ("GET /api/v1/predictions/{uid}/", "GET /api/v1/batches/{uid}/", "GET /api/v1/evaluations/{uid}/"):
        assert seen[label][200], label
