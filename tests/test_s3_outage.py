"""S3 down for a few seconds in the middle of a batch: the worker's S3 client retries (botocore standard mode, with
back-off), and the batch finishes with every image classified exactly once.

The worker reaches the real S3 API (moto server, tests/s3.py) through a loopback TCP proxy that drops every
connection, and resets each new one, from the 30th request on for a few seconds, then lets them through again.
"""

from __future__ import annotations

import pytest

from classifier.models import Prediction
from classifier.registry import ensure_onnx
from reports.models import Batch, BatchItem
from reports.submission import submit_batch
from reports.uploads import NamedBytes
from tests.conftest import image_bytes, start_worker
from tests.s3 import FlakyProxy
from tests.workers import stop_worker, wait_until_finished

pytestmark = pytest.mark.django_db(transaction=True)

IMAGES = 40  # two chunks of the worker: about four S3 requests each (read the image, write its thumbnail)
OUTAGE_AFTER_REQUESTS = 30
OUTAGE_S = 3.0


@pytest.fixture
def proxy(s3_server):
    port = int(s3_server.endpoint.rsplit(":", 1)[1])
    flaky = FlakyProxy(port)
    yield flaky
    flaky.close()


def test_s3_down_for_a_few_seconds_mid_batch_is_retried_and_every_image_is_classified_once(
    s3_media, proxy, technologist, tiny_record, models_dir, settings, tmp_path
):
    settings.WBC_ONNX_DIR = tmp_path / "onnx"
    ensure_onnx(tiny_record)
    entries = [NamedBytes(f"cell{i:02}.png", image_bytes(color=(3 * i, 120, 200 - 2 * i))) for i in range(IMAGES)]
    batch = submit_batch(technologist, entries, tiny_record, name="Slide while S3 hiccups")  # stored directly
    proxy.fail_after(OUTAGE_AFTER_REQUESTS, OUTAGE_S)
    worker = start_worker(
        settings,
        models_dir,
        **{**s3_media.env, "AWS_S3_ENDPOINT_URL": proxy.endpoint},  # the worker's only way to S3
        MEDIA_ROOT=str(tmp_path / "worker-media"),
        WBC_MODEL_CACHE_DIR=str(tmp_path / "worker-cache"),
        WBC_S3_MAX_ATTEMPTS="10",
        WBC_S3_CONNECT_TIMEOUT="2",
        WBC_S3_READ_TIMEOUT="10",
    )
    try:
        batch = wait_until_finished(batch, worker)
    finally:
        output = stop_worker(worker)

    assert proxy.outage_started.is_set() and proxy.outage_over.is_set()
    assert proxy.refused > 0, "nobody tried S3 while it was down: the outage did not hit the batch"
    assert proxy.requests_after_outage > 0, "the batch did not go on after S3 came back"
    assert batch.status == Batch.Status.DONE, f"{batch.status}: {batch.error}\n{output}"
    items = list(batch.items.order_by("position"))
    assert [item.status for item in items] == [BatchItem.Status.DONE] * IMAGES
    predictions = Prediction.objects.filter(batch_item__batch=batch)
    assert predictions.count() == IMAGES == Prediction.objects.count()  # once each, nothing doubled
    assert len({item.prediction_id for item in items}) == IMAGES
    keys = set(s3_media.keys())
    assert all(item.thumbnail.name in keys for item in items)
