"""The job lifecycle as the web tier sees it (service/web/jobs.py) and the queue helpers both tiers share
(service/queue.py), against a real private Redis and RQ's own state changes, with no worker process: each RQ state
a job can be in is made by RQ's API (enqueue, prepare_for_execution, the success and failure handlers, cancel),
then read back through `job_status`. Fast, so that the mutation check (bench/mutation.py) can run it per mutant."""

from __future__ import annotations

import json
import time
import uuid
from datetime import datetime, timedelta, timezone

import pytest
from redis import Redis
from redis.backoff import NoBackoff
from redis.client import Pipeline
from redis.retry import Retry
from rq.executions import Execution
from rq.job import Job, JobStatus
from rq.job_lifecycle import record_job_failure
from rq.serializers import JSONSerializer

from service.contract import JOB_FUNCTION, ImageInfo, JobRequest, alive_key, upload_key, upload_ledger_keys
from service.errors import NotFound, Unavailable
from service.queue import (admit_uploads, as_utc, connect, fail_if_orphaned, get_queue, live_workers, release_uploads,
                           started_registry)
from service.settings import Settings, load_settings
from service.web.jobs import PUBLIC_STATUS, failure_reason, fetch_job, job_status, submit
from service.worker.heartbeat import Heartbeat, publish_alive, reap_orphans


@pytest.fixture
def settings(redis_url) -> Settings:
    """A queue of its own per test, so that positions and counts start at zero."""
    return load_settings({"REDIS_URL": redis_url, "QUEUE_NAME": f"jobs-{uuid.uuid4().hex[:8]}",
                          "WORKER_HEARTBEAT_TTL": "5", "JOB_TIMEOUT": "77", "UPLOAD_TTL": "600",
                          "RESULT_TTL": "900", "FAILURE_TTL": "1800"})


@pytest.fixture
def connection(redis_url) -> Redis:
    return Redis.from_url(redis_url)


def request(**fields) -> JobRequest:
    return JobRequest(**{"text": "what is on the table?", "tasks": ["vqa", "gqa"], **fields})


def ledger(connection: Redis, settings: Settings) -> dict[bytes, bytes]:
    return connection.hgetall(upload_ledger_keys(settings.queue_name)[1])


def reread(connection: Redis, job: Job) -> Job:
    return Job.fetch(job.id, connection=connection, serializer=JSONSerializer)


def start(connection: Redis, job: Job, worker: str = "w1", started_ago_s: float = 0.0, ttl: int = 600) -> Job:
    """Mark `job` started by `worker`, as RQ's worker does (an execution in the started registry, ordered there by
    `ttl`, then the job's own status), `started_ago_s` seconds in the past."""
    with connection.pipeline() as pipe:
        Execution.create(job, ttl=ttl, pipeline=pipe, worker_name=worker)
        job.prepare_for_execution(worker, pipeline=pipe)
        pipe.execute()
    if started_ago_s:
        then = datetime.now(timezone.utc) - timedelta(seconds=started_ago_s)
        connection.hset(job.key, "started_at", then.strftime("%Y-%m-%dT%H:%M:%S.%fZ"))
    return reread(connection, job)


def fail(connection: Redis, job: Job, exc_string: str) -> Job:
    with connection.pipeline() as pipe:
        record_job_failure(job, exc_string, pipe)
        pipe.execute()
    return reread(connection, job)


# ---------------------------------------------------------------------------------------------------- submit


def test_submit_stores_the_uploads_then_queues_the_job_with_the_settings_limits(connection, settings):
    job = submit(connection, settings, request(images=[ImageInfo(4, 3, 5, 36)]), [b"first", b"second!"])
    assert len(job.id) == 32 and int(job.id, 16) >= 0
    assert connection.hgetall(upload_key(job.id)) == {b"0": b"first", b"1": b"second!"}
    assert 0 < connection.ttl(upload_key(job.id)) <= 600
    assert ledger(connection, settings) == {job.id.encode(): b"12"}
    queued = reread(connection, job)
    assert queued.func_name == JOB_FUNCTION and queued.origin == settings.queue_name
    assert JobRequest.from_json(queued.kwargs["request"]) == request(images=[ImageInfo(4, 3, 5, 36)])
    assert (queued.timeout, queued.result_ttl, queued.failure_ttl, queued.ttl) == (77, 900, 1800, 600)
    assert queued.meta == {"stage": "queued", "tasks": ["vqa", "gqa"]}
    assert queued.description == "vqa,gqa on 2 image(s)"
    assert get_queue(connection, settings).job_ids == [job.id]


def test_submit_keeps_a_given_id_and_describes_collection_jobs_by_kind_and_name(connection, settings):
    job_id = uuid.uuid4().hex
    job = submit(connection, settings, request(kind="collection_add", collection="shelf"), [b"img"], job_id=job_id)
    assert job.id == job_id and reread(connection, job).description == "collection_add shelf: 1 image(s)"
    search = submit(connection, settings, request(kind="collection_search", collection="shelf"), [])
    assert reread(connection, search).description == "collection_search shelf: 0 image(s)"
    assert not connection.exists(upload_key(search.id))  # a search has no uploads: no hash at all
    assert ledger(connection, settings) == {job_id.encode(): b"3", search.id.encode(): b"0"}


def test_a_full_queue_refuses_at_its_limit_and_stores_nothing(connection, settings):
    settings = Settings(**{**settings.__dict__, "max_queued_jobs": 2})
    first = submit(connection, settings, request(), [b"a"])
    submit(connection, settings, request(), [b"b"])
    with pytest.raises(Unavailable) as refused:
        submit(connection, settings, request(), [b"c"], job_id="f" * 32)
    assert refused.value.status == 503 and refused.value.code == "queue_full"
    assert refused.value.message == "2 jobs are waiting, the limit is 2; retry later"
    assert not connection.exists(upload_key("f" * 32)) and b"f" * 32 not in ledger(connection, settings)
    get_queue(connection, settings).remove(first.id)  # one fewer waiting: admitted again
    assert submit(connection, settings, request(), [b"c"]).id in get_queue(connection, settings).job_ids


def test_the_byte_budget_refuses_with_what_is_held_and_stores_nothing(connection, settings):
    settings = Settings(**{**settings.__dict__, "max_queued_bytes": 10})
    submit(connection, settings, request(), [b"123456"])
    with pytest.raises(Unavailable) as refused:
        submit(connection, settings, request(), [b"12", b"345"], job_id="e" * 32)
    assert refused.value.code == "queue_full" and refused.value.message == (
        "waiting jobs hold 6 bytes of uploads; this job's 5 bytes would pass the limit of 10; retry later")
    assert not connection.exists(upload_key("e" * 32)) and len(get_queue(connection, settings)) == 1


def test_a_job_that_cannot_be_queued_gives_its_uploads_and_bytes_back(connection, settings):
    # A text that is not JSON-serialisable makes RQ's serializer fail after the uploads were stored.
    with pytest.raises(TypeError):
        submit(connection, settings, request(text=b"bytes are not JSON"), [b"upload"], job_id="d" * 32)
    assert not connection.exists(upload_key("d" * 32))
    assert ledger(connection, settings) == {} and len(get_queue(connection, settings)) == 0


# ------------------------------------------------------------------------------------------------- fetch_job


@pytest.mark.parametrize("job_id", ["", "abc", "0" * 31, "0" * 33, "A" * 32, "0" * 32 + "\n", "../" + "0" * 29])
def test_a_malformed_id_is_unknown_without_asking_redis(connection, job_id):
    with pytest.raises(NotFound) as missing:
        fetch_job(connection, job_id)
    assert missing.value.status == 404 and missing.value.code == "unknown_job"
    assert missing.value.message == f"no job {job_id!r} (unknown or expired)"


def test_a_well_formed_id_that_was_never_queued_is_unknown(connection, settings):
    with pytest.raises(NotFound) as missing:
        fetch_job(connection, "0" * 32)
    assert missing.value.status == 404 and missing.value.code == "unknown_job"
    assert missing.value.message == "no job '00000000000000000000000000000000' (unknown or expired)"
    job = submit(connection, settings, request(), [b"x"])
    assert fetch_job(connection, job.id).id == job.id


# ------------------------------------------------------------------------------------------------ job_status


def test_a_queued_job_reports_its_position_and_times_in_utc(connection, settings):
    jobs = [submit(connection, settings, request(), [b"x"]) for _ in range(2)]
    first, second = (job_status(connection, settings, job.id) for job in jobs)
    assert first["status"] == "queued" and first["tasks"] == ["vqa", "gqa"] and first["id"] == jobs[0].id
    assert (first["queue_position"], second["queue_position"]) == (0, 1)
    for name in ("created_at", "enqueued_at"):
        stamp = first[name]
        assert stamp.endswith("Z") and "+" not in stamp
        assert abs(datetime.fromisoformat(stamp.replace("Z", "+00:00")) - datetime.now(timezone.utc)) < timedelta(
            minutes=5)
    assert {"started_at", "ended_at", "stage", "result", "error"}.isdisjoint(first)


def test_a_started_job_reports_starting_until_the_worker_names_a_stage(connection, settings):
    connection.set(alive_key("w1"), "{}")
    job = start(connection, submit(connection, settings, request(), [b"x"]))
    body = job_status(connection, settings, job.id)
    assert body["status"] == "started" and body["stage"] == "starting" and "started_at" in body
    assert {"queue_position", "stage_detail", "result", "error", "ended_at"}.isdisjoint(body)
    for meta, stage in (({"stage": None}, "starting"), ({}, "starting"), ({"stage": "detector"}, "detector")):
        job.meta = meta
        job.save_meta()
        body = job_status(connection, settings, job.id)
        assert body["stage"] == stage and body["tasks"] == meta.get("tasks", [])
    job.meta = {"stage": "indexing", "stage_detail": "3/10"}
    job.save_meta()
    body = job_status(connection, settings, job.id)
    assert (body["stage"], body["stage_detail"]) == ("indexing", "3/10")


def test_a_finished_job_reports_its_result(connection, settings):
    job = start(connection, submit(connection, settings, request(), [b"x"]))
    job._result = {"vqa": [{"answer": "cat", "score": 0.5}]}
    job.ended_at = datetime(2026, 12, 4, 12, 30, 5, 250000, tzinfo=timezone.utc)  # as the worker sets it
    with connection.pipeline() as pipe:
        job._handle_success(900, pipeline=pipe)
        pipe.execute()
    body = job_status(connection, settings, job.id)
    assert body["status"] == "finished" and body["result"] == {"vqa": [{"answer": "cat", "score": 0.5}]}
    assert body["ended_at"] == "2026-12-04T12:30:05.250000Z"
    assert {"error", "stage", "queue_position"}.isdisjoint(body)


def test_a_failed_job_reports_the_workers_own_error_first(connection, settings):
    job = start(connection, submit(connection, settings, request(), [b"x"]))
    job.meta["error"] = {"code": "bad_image", "message": "not an image", "stage": "decode"}
    job.save_meta()
    job = fail(connection, job, "Traceback...\nJobTimeoutException: too long")
    body = job_status(connection, settings, job.id)
    assert body["status"] == "failed" and body["error"] == {"code": "bad_image", "message": "not an image",
                                                             "stage": "decode"}
    assert "ended_at" not in body or body["ended_at"].endswith("Z")
    assert {"result", "stage", "queue_position"}.isdisjoint(body)


@pytest.mark.parametrize("exc_string, code, message", [
    ("Traceback (most recent call last):\nrq.timeouts.JobTimeoutException: Task exceeded maximum timeout value",
     "timeout", "the job ran longer than its timeout of 77 s"),
    ("rq.exceptions.AbandonedJobError: work-horse terminated unexpectedly", "worker_lost",
     "the worker running this job stopped before finishing it"),
    ("Traceback (most recent call last):\n  File \"x.py\"\nValueError: the last line\n\n", "internal_error",
     "ValueError: the last line"),
    ("", "internal_error", "unknown error"),
    (" \n ", "internal_error", "unknown error"),
])
def test_a_job_that_failed_without_an_error_of_ours_is_explained_from_rqs_record(connection, settings, exc_string,
                                                                                code, message):
    job = fail(connection, start(connection, submit(connection, settings, request(), [b"x"])), exc_string)
    assert failure_reason(job) == {"code": code, "message": message}
    assert job_status(connection, settings, job.id)["error"] == {"code": code, "message": message}


@pytest.mark.parametrize("how", ["cancel", "stop"])
def test_a_canceled_or_stopped_job_is_failed_as_canceled(connection, settings, how):
    job = submit(connection, settings, request(), [b"x"])
    if how == "cancel":
        job.cancel()
    else:
        job.set_status(JobStatus.STOPPED)
    body = job_status(connection, settings, job.id)
    assert body["status"] == "failed"
    assert body["error"] == {"code": "canceled", "message": "the job was stopped or canceled"}


def test_a_started_job_whose_worker_vanished_is_failed_when_a_client_asks(connection, settings):
    job = start(connection, submit(connection, settings, request(), [b"x"]), worker="gone", started_ago_s=60)
    body = job_status(connection, settings, job.id)
    assert body["status"] == "failed" and body["error"]["code"] == "worker_lost"
    assert body["error"]["message"] == ("the worker gone stopped (killed, crashed or paused) while running this job; "
                                        "no heartbeat for 5 s")


def test_a_failed_job_with_no_failure_record_is_an_unknown_error(connection, settings):
    job = submit(connection, settings, request(), [b"x"])
    job.set_status(JobStatus.FAILED)
    assert job_status(connection, settings, job.id)["error"] == {"code": "internal_error", "message": "unknown error"}


def test_every_rq_status_has_a_public_name():
    # job_status indexes PUBLIC_STATUS: a status a new RQ adds must be given its public name here first.
    assert set(PUBLIC_STATUS) == set(JobStatus)
    assert set(PUBLIC_STATUS.values()) == {"queued", "started", "finished", "failed"}


# --------------------------------------------------------------------------------------------- service.queue


def test_connect_uses_the_settings_url_and_short_timeouts(settings):
    settings = Settings(**{**settings.__dict__, "redis_timeout": 1.5})
    client = connect(settings)
    options = client.connection_pool.connection_kwargs
    assert (options["socket_timeout"], options["socket_connect_timeout"]) == (1.5, 1.5)
    assert options["health_check_interval"] == 10
    assert client.ping()


def test_get_queue_speaks_json_with_the_job_timeout(connection, settings):
    queue = get_queue(connection, settings)
    assert queue.name == settings.queue_name and queue.serializer is JSONSerializer
    assert queue._default_timeout == 77
    registry = started_registry(connection, settings)
    assert registry.name == settings.queue_name and registry.serializer is JSONSerializer


def test_release_gives_back_exactly_one_jobs_bytes_and_uploads(connection, settings):
    kept, dropped = (submit(connection, settings, request(), [b"x" * n]) for n in (3, 4))
    release_uploads(connection, settings, dropped.id)
    assert not connection.exists(upload_key(dropped.id)) and connection.exists(upload_key(kept.id))
    expiry, _ = upload_ledger_keys(settings.queue_name)
    assert ledger(connection, settings) == {kept.id.encode(): b"3"}
    assert connection.zrange(expiry, 0, -1) == [kept.id.encode()]
    assert admit_uploads(connection, settings, "next", 0) == (True, 3)


def test_live_workers_lists_the_readable_liveness_keys_only(connection):
    prefix = uuid.uuid4().hex
    good = {f"{prefix}-{i:02d}": {"name": f"{prefix}-{i:02d}", "device": "cpu"} for i in range(30)}
    for name, info in good.items():
        connection.set(alive_key(name), json.dumps(info))
    # Unreadable keys are skipped, not the end of the list: with three that are not JSON among 33 such keys in
    # SCAN's (random) order, one comes before a readable key in all but 2 of 10,000 runs.
    for name, raw in (("bad-1", "{not json"), ("bad-2", "[1,"), ("bad-3", "nul"), ("empty", "")):
        connection.set(alive_key(f"{prefix}-{name}"), raw)
    connection.set("unrelated:" + prefix, json.dumps({"name": prefix + "-unrelated"}))
    mine = [w for w in live_workers(connection) if w.get("name", "").startswith(prefix)]
    assert sorted(mine, key=lambda w: w["name"]) == list(good.values())


def test_only_a_started_job_is_ever_an_orphan(connection, settings):
    job = submit(connection, settings, request(), [b"x"])
    assert not fail_if_orphaned(connection, settings, job)
    assert reread(connection, job).get_status() == JobStatus.QUEUED


def test_a_job_started_within_one_heartbeat_ttl_is_not_yet_an_orphan(connection, settings):
    job = start(connection, submit(connection, settings, request(), [b"x"]), worker="new", started_ago_s=3)
    assert not fail_if_orphaned(connection, settings, job)
    naive = reread(connection, job)  # RQ may hand back a naive UTC time: it is read as UTC, not local time
    naive.started_at = naive.started_at.replace(tzinfo=None)
    assert not fail_if_orphaned(connection, settings, naive)
    assert reread(connection, job).get_status() == JobStatus.STARTED


def test_a_job_whose_worker_is_alive_is_not_an_orphan(connection, settings):
    connection.set(alive_key("alive"), "{}")
    job = start(connection, submit(connection, settings, request(), [b"x"]), worker="alive", started_ago_s=60)
    assert not fail_if_orphaned(connection, settings, job)
    assert reread(connection, job).get_status() == JobStatus.STARTED


def test_a_copy_fetched_while_the_job_was_queued_does_not_make_it_an_orphan(connection, settings):
    """The web tier's poll fetched the job while it was queued; a live worker started it since. That copy had no
    worker and no start time: it must not get the job failed (a CI run of the web page saw exactly this)."""
    connection.set(alive_key("alive"), "{}")
    queued = submit(connection, settings, request(), [b"x"])
    stale = reread(connection, queued)
    start(connection, queued, worker="alive", started_ago_s=60)
    assert stale.worker_name is None and stale.started_at is None
    assert not fail_if_orphaned(connection, settings, stale)
    assert reread(connection, queued).get_status() == JobStatus.STARTED
    assert not fail_if_orphaned(connection, settings, _deleted_copy(connection, settings))  # gone: nothing to fail


def _deleted_copy(connection, settings):
    job = submit(connection, settings, request(), [b"z"])
    copy = reread(connection, job)
    job.delete()
    return copy


@pytest.mark.parametrize("orphan_ttl", [100, 600], ids=["first-in-registry", "last-in-registry"])
def test_an_orphan_is_failed_once_taken_off_the_started_registry_and_its_uploads_released(connection, settings,
                                                                                          orphan_ttl, caplog):
    connection.set(alive_key("alive"), "{}")
    others = [start(connection, submit(connection, settings, request(), [b"yy"]), worker="alive", ttl=ttl)
              for ttl in (200, 300)]
    job = start(connection, submit(connection, settings, request(), [b"x"]), worker="lost", started_ago_s=60,
                ttl=orphan_ttl)
    registry = started_registry(connection, settings)
    assert sorted(registry.get_job_ids()) == sorted([job.id] + [o.id for o in others])
    with caplog.at_level("WARNING", logger="service.queue"):
        assert fail_if_orphaned(connection, settings, job)
    message = "the worker lost stopped (killed, crashed or paused) while running this job; no heartbeat for 5 s"
    assert caplog.messages == [f"job {job.id} failed: {message}"]
    failed = reread(connection, job)
    assert failed.get_status() == JobStatus.FAILED and failed.meta["error"] == {"code": "worker_lost",
                                                                                 "message": message}
    assert failed.latest_result().exc_string == f"WorkerLost: {message}"
    assert sorted(registry.get_job_ids()) == sorted(o.id for o in others)
    assert not connection.exists(upload_key(job.id))
    assert ledger(connection, settings) == {o.id.encode(): b"2" for o in others}
    assert not fail_if_orphaned(connection, settings, failed)
    assert all(reread(connection, o).get_status() == JobStatus.STARTED for o in others)


def test_an_orphan_without_a_worker_name_is_failed_too(connection, settings):
    job = start(connection, submit(connection, settings, request(), [b"x"]), worker="", started_ago_s=60)
    job.worker_name = None
    assert fail_if_orphaned(connection, settings, job)
    assert reread(connection, job).meta["error"]["message"].startswith("the worker ? stopped")


class RacingRedis(Redis):
    """A client whose transactions let `race` run at one point of fail_if_orphaned's transaction: "watch" (just
    after WATCH, before the job and the worker's liveness key are read) or "multi" (after they are read, before
    the commit). The only stand-in in this file: the race cannot be caused on time otherwise."""

    race = staticmethod(lambda: None)
    race_at = "multi"

    def pipeline(self, transaction: bool = True, shard_hint=None) -> Pipeline:
        race, race_at = self.race, self.race_at

        class RacingPipeline(Pipeline):
            def watch(self, *names) -> None:
                super().watch(*names)
                if race_at == "watch":
                    race()

            def multi(self) -> None:
                if race_at == "multi":
                    race()
                super().multi()

        return RacingPipeline(self.connection_pool, self.response_callbacks, transaction, shard_hint)


@pytest.mark.parametrize("race_at", ["watch", "multi"])
@pytest.mark.parametrize("what_lands", ["outcome", "heartbeat"])
def test_an_orphan_check_that_loses_the_race_commits_nothing(redis_url, settings, race_at, what_lands):
    # "outcome": the worker finishes the job; "heartbeat": the worker renews its liveness key (it was paused).
    plain, worker, raced = Redis.from_url(redis_url), f"slow-{uuid.uuid4().hex[:8]}", []
    job = start(plain, submit(plain, settings, request(), [b"x"]), worker=worker, started_ago_s=60)
    if what_lands == "outcome":
        RacingRedis.race = staticmethod(lambda: raced.append(plain.hset(job.key, "status", "finished")))
    else:
        RacingRedis.race = staticmethod(lambda: raced.append(plain.set(alive_key(worker), "{}", ex=30)))
    RacingRedis.race_at = race_at
    racing = RacingRedis.from_url(redis_url)
    try:
        assert not fail_if_orphaned(racing, settings, job)
    finally:
        RacingRedis.race, RacingRedis.race_at = staticmethod(lambda: None), "multi"
    assert len(raced) == 1  # the race happened, at the point asked for
    assert "error" not in reread(plain, job).meta and plain.exists(upload_key(job.id))
    assert started_registry(plain, settings).get_job_ids() == [job.id]
    assert plain.hget(job.key, "status") == (b"finished" if what_lands == "outcome" else b"started")


def test_a_job_read_as_started_that_has_since_finished_is_left_alone(connection, settings):
    job = start(connection, submit(connection, settings, request(), [b"x"]), worker="lost", started_ago_s=60)
    connection.hset(job.key, "status", JobStatus.FINISHED.value)  # the outcome lands after the caller's read
    assert not fail_if_orphaned(connection, settings, job)
    assert connection.hget(job.key, "status") == b"finished" and "error" not in reread(connection, job).meta


def test_as_utc_reads_naive_times_as_utc_whatever_the_local_zone(monkeypatch):
    monkeypatch.setenv("TZ", "America/New_York")
    time.tzset()
    try:
        naive = datetime(2026, 12, 4, 12, 0, 0)
        assert as_utc(naive) == datetime(2026, 12, 4, 12, 0, 0, tzinfo=timezone.utc)
        assert as_utc(naive).tzinfo is timezone.utc
        berlin = datetime(2026, 12, 4, 13, 0, 0, tzinfo=timezone(timedelta(hours=1)))
        assert as_utc(berlin) == naive.replace(tzinfo=timezone.utc) and as_utc(berlin).tzinfo == timezone.utc
        assert as_utc(berlin).hour == 12
    finally:
        monkeypatch.delenv("TZ")
        time.tzset()


# ------------------------------------------------------------------------------------- the worker's heartbeat


def wait_for(condition, what: str, timeout_s: float = 30.0):
    """Poll `condition` until it returns something true (the heartbeat runs in its own thread)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


def test_a_liveness_key_holds_the_workers_info_for_its_ttl(connection):
    name = f"w-{uuid.uuid4().hex[:8]}"
    publish_alive(connection, name, {"device": "cpu", "pid": 7}, 9)
    assert json.loads(connection.get(alive_key(name))) == {"device": "cpu", "pid": 7}
    assert 8 <= connection.ttl(alive_key(name)) <= 9


def test_the_reaper_fails_only_orphans_and_drops_entries_of_vanished_jobs(connection, settings):
    connection.set(alive_key("alive-w"), "{}")
    orphan = start(connection, submit(connection, settings, request(), [b"a"]), worker="gone-w", started_ago_s=60)
    kept = start(connection, submit(connection, settings, request(), [b"b"]), worker="alive-w", started_ago_s=60)
    young = start(connection, submit(connection, settings, request(), [b"c"]), worker="gone-w", started_ago_s=1)
    vanished = start(connection, submit(connection, settings, request(), [b"d"]), worker="gone-w", started_ago_s=60)
    connection.delete(vanished.key)
    registry = started_registry(connection, settings)
    assert len(connection.zrange(registry.key, 0, -1)) == 4
    assert reap_orphans(connection, settings) == [orphan.id]
    assert reread(connection, orphan).get_status() == JobStatus.FAILED
    # the error is written in the jobs' own JSON, as the web tier reads it
    assert reread(connection, orphan).meta["error"]["code"] == "worker_lost"
    assert [reread(connection, job).get_status() for job in (kept, young)] == [JobStatus.STARTED] * 2
    left = sorted(entry.decode().split(":")[0] for entry in connection.zrange(registry.key, 0, -1))
    assert left == sorted([kept.id, young.id])
    assert reap_orphans(connection, settings) == []


def test_a_beat_publishes_the_named_worker_and_reaps(connection, settings):
    orphan = start(connection, submit(connection, settings, request(), [b"a"]), worker="gone-w", started_ago_s=60)
    heartbeat = Heartbeat(connection, settings, {"device": "cpu"})
    assert (heartbeat.name, heartbeat.daemon, heartbeat.worker_name) == ("heartbeat", True, None)
    heartbeat.beat()  # no name yet (RQ names the worker when it registers): reaps only
    assert reread(connection, orphan).get_status() == JobStatus.FAILED
    name = f"w-{uuid.uuid4().hex[:8]}"
    heartbeat.worker_name = name
    heartbeat.beat()
    assert json.loads(connection.get(alive_key(name))) == {"device": "cpu", "name": name}
    assert settings.worker_heartbeat_ttl - 1 <= connection.ttl(alive_key(name)) <= settings.worker_heartbeat_ttl
    heartbeat.retire(name)
    assert connection.get(alive_key(name)) is None
    heartbeat.retire(None)  # a worker that never registered has nothing to retire


def test_the_heartbeat_thread_beats_until_stopped(connection, settings):
    fast = load_settings({"REDIS_URL": settings.redis_url, "QUEUE_NAME": settings.queue_name,
                          "WORKER_HEARTBEAT_TTL": "2"})
    heartbeat = Heartbeat(connection, fast, {})
    heartbeat.worker_name = name = f"w-{uuid.uuid4().hex[:8]}"
    heartbeat.start()
    try:
        wait_for(lambda: connection.get(alive_key(name)), "the first beat")
        connection.delete(alive_key(name))
        wait_for(lambda: connection.get(alive_key(name)), "the next beat, a third of the TTL later")
    finally:
        heartbeat.stopped.set()
        heartbeat.join(timeout=30)
    assert not heartbeat.is_alive()


class FailingBeat(Heartbeat):
    def beat(self) -> None:
        self.beats = getattr(self, "beats", 0) + 1
        raise RuntimeError(f"beat {self.beats} broke")


def test_a_heartbeat_outlives_redis_outages_and_its_own_errors(settings, caplog):
    fast = load_settings({"REDIS_URL": settings.redis_url, "QUEUE_NAME": settings.queue_name,
                          "WORKER_HEARTBEAT_TTL": "2"})
    unreachable = Redis(host="127.0.0.1", port=1, socket_connect_timeout=1, retry=Retry(NoBackoff(), 0))
    caplog.set_level("WARNING", logger="service.worker.heartbeat")
    for heartbeat, first, second in [
            (Heartbeat(unreachable, fast, {}), "heartbeat: redis unavailable (Error 111 connecting to 127.0.0.1:1. "
                                                "Connection refused.)", None),
            (FailingBeat(unreachable, fast, {}), "heartbeat failed", "beat 2 broke")]:
        caplog.clear()
        heartbeat.worker_name = "w"
        heartbeat.start()
        def logged():
            return [record for record in caplog.records if record.name == "service.worker.heartbeat"]

        try:  # it keeps beating after a failure: two failures are logged
            records = wait_for(lambda: len(logged()) >= 2 and logged(), "two failures")
        finally:
            heartbeat.stopped.set()
            heartbeat.join(timeout=30)
        assert not heartbeat.is_alive()
        assert records[0].getMessage() == first
        if second:
            assert records[0].levelname == "ERROR" and str(records[1].exc_info[1]) == second
        else:
            assert records[0].levelname == "WARNING"
    Heartbeat(unreachable, fast, {}).retire("w")  # retiring without Redis is quiet: the key expires by itself
