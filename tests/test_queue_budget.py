"""The queue's byte budget (MAX_QUEUED_BYTES): a job is admitted only while the uploads waiting in Redis stay under
the budget; otherwise 503 queue_full with Retry-After, and nothing of the refused job is stored. Real Redis; the
HTTP part through the app's own routes."""

from __future__ import annotations

import io
import time
import uuid
from dataclasses import replace

import pytest
from PIL import Image
from redis import Redis

from service.contract import upload_key, upload_ledger_keys
from service.queue import admit_uploads, release_uploads
from service.settings import load_settings
from service.web import create_app


def settings_for(redis_url: str, **env: str):
    return load_settings({"REDIS_URL": redis_url, "QUEUE_NAME": f"budget-{uuid.uuid4().hex[:8]}", **env})


def test_admission_is_exact_at_the_budget_and_released_bytes_come_back(redis_url):
    settings = settings_for(redis_url, MAX_QUEUED_BYTES="2000")
    connection = Redis.from_url(redis_url)
    assert admit_uploads(connection, settings, "a", 1200) == (True, 1200)
    assert admit_uploads(connection, settings, "b", 801) == (False, 1200)  # 2001 > 2000
    assert admit_uploads(connection, settings, "b", 800) == (True, 2000)  # exactly at the budget
    assert admit_uploads(connection, settings, "c", 1) == (False, 2000)
    release_uploads(connection, settings, "a")
    assert admit_uploads(connection, settings, "c", 1200) == (True, 2000)
    expiry, sizes = upload_ledger_keys(settings.queue_name)
    assert sorted(connection.hkeys(sizes)) == [b"b", b"c"] and connection.zcard(expiry) == 2


def test_entries_past_the_upload_ttl_stop_counting(redis_url):
    # An upload hash expires after UPLOAD_TTL if no worker took the job; its ledger entry must expire with it.
    settings = replace(settings_for(redis_url, MAX_QUEUED_BYTES="2000"), upload_ttl=1)
    connection = Redis.from_url(redis_url)
    assert admit_uploads(connection, settings, "old", 2000) == (True, 2000)
    assert admit_uploads(connection, settings, "new", 10)[0] is False
    deadline = time.monotonic() + 30
    while not admit_uploads(connection, settings, "new", 10)[0]:
        assert time.monotonic() < deadline, "the expired entry still counts"
        time.sleep(0.2)
    assert connection.hkeys(upload_ledger_keys(settings.queue_name)[1]) == [b"new"]


def jpeg(seed: int) -> bytes:
    buffer = io.BytesIO()
    Image.effect_noise((120, 90), 40 + seed).convert("RGB").save(buffer, "JPEG", quality=90)
    return buffer.getvalue()


def post(client, image: bytes):
    return client.post("/api/v1/jobs", data={"text": "what is this?", "tasks": "vqa",
                                             "image": (io.BytesIO(image), "x.jpg")})


def test_a_submission_past_the_budget_is_a_503_with_retry_after_and_stores_nothing(redis_url):
    images = [jpeg(i) for i in range(4)]
    budget = sum(len(i) for i in images[:3]) + len(images[3]) // 2  # room for three, not four
    settings = settings_for(redis_url, MAX_QUEUED_BYTES=str(budget))
    client = create_app(settings).test_client()
    connection = Redis.from_url(redis_url)
    accepted = [post(client, image) for image in images[:3]]
    assert [r.status_code for r in accepted] == [202, 202, 202]
    refused = post(client, images[3])
    assert refused.status_code == 503 and int(refused.headers["Retry-After"]) > 0
    error = refused.get_json()["error"]
    held = sum(len(i) for i in images[:3])
    assert error == {"code": "queue_full", "message": f"waiting jobs hold {held} bytes of uploads; this job's "
                                                      f"{len(images[3])} bytes would pass the limit of {budget}; "
                                                      "retry later"}
    stored = [k for k in connection.scan_iter(match=upload_key("*"))
              if k.decode().removeprefix(upload_key("")) in {r.get_json()["id"] for r in accepted}]
    assert len(stored) == 3
    assert len(connection.hkeys(upload_ledger_keys(settings.queue_name)[1])) == 3  # the refused job left nothing
    release_uploads(connection, settings, accepted[0].get_json()["id"])  # a worker finished one
    assert post(client, images[3]).status_code == 202


@pytest.mark.parametrize("value", ["0", "1023", "-5", "lots"])
def test_the_budget_setting_is_validated(value):
    with pytest.raises(Exception) as caught:
        load_settings({"MAX_QUEUED_BYTES": value})
    assert "MAX_QUEUED_BYTES" in str(caught.value)
