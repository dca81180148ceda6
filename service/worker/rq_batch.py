"""The batch loop, and every use of RQ's internals in the service: one module, pinned to the RQ version it was
written against (RQ_VERSION; tests/test_service_units.py fails on any other, so an upgrade is checked here first).

Dynamic batching: take up to BATCH_MAX_JOBS waiting jobs and run them as one pass. RQ 3.0 has no way to dequeue
several jobs at once (`Worker.work` takes one job, `execute_job` runs it), so BatchWorker extends SimpleWorker's
`execute_job`: having got one job from RQ's blocking dequeue, it takes more with RQ's own non-blocking
`Queue.dequeue_any` (LMOVE into the intermediate queue, as RQ does) until it has BATCH_MAX_JOBS or
BATCH_MAX_WAIT_MS have passed. Then, with RQ's primitives and in RQ's order:

1. every job gets an Execution (`prepare_execution`: StartedJobRegistry, worker busy) and is marked started
   with this worker's name (`prepare_job_execution`) BEFORE any work, so a worker killed mid-batch leaves only
   started jobs that the orphan reaper (service.worker.heartbeat.reap_orphans) fails as worker_lost;
2. the batch runs once: `Pipeline.run_many` (decode, cache / one detector call over every image, ONE ViLBERT
   forward over every request), killed after the longest job timeout of the batch; a job whose own timeout
   the batch overran then fails as `timeout`, its partners keep their results;
3. each job then goes through RQ's normal `perform_job` (success/failure handling, result TTL, registries,
   callbacks): its BatchJob returns the outcome computed in step 2; no job function is ever called.
Each job keeps its own status, result or error: a bad job fails alone (Pipeline.run_many's contract).

Fencing: the orphan reaper (service.queue.fail_if_orphaned) fails a started job whose worker's liveness key has
expired, e.g. a worker paused (SIGSTOP, a VM freeze) past WORKER_HEARTBEAT_TTL. Such a worker, once it resumes,
must not write anything for the job: a failed job stays failed. Every write of a job's outcome is therefore
conditional on the job still being `started` by this worker, checked atomically with the write:
- the outcome (RQ's perform_job: result, status, registries) goes through `FencingPipeline`: its transaction
  WATCHes the job hash and checks status and owner first, so the reaper's transaction and ours cannot both
  commit (whichever commits second sees the hash changed and aborts);
- progress and error details go through a Lua script (`OWNED_HSET`) that writes only while the job is ours.
A refused write is logged and counted (vilbert_discarded_results_total).

Why SimpleWorker: RQ's default Worker forks a child per job, and CUDA state does not survive fork (and
reloading the models per job would cost seconds). SimpleWorker runs each job in the main process.

One worker process per GPU: start `CUDA_VISIBLE_DEVICES=N python worker.py` once per GPU (docs/SCALE.md);
all workers on all hosts share the queue, and each batches what it takes.
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from typing import Any

from redis import Redis
from redis.client import Pipeline as RedisPipeline
from redis.exceptions import ConnectionError as RedisConnectionError, RedisError, TimeoutError as RedisTimeoutError
from rq import Queue, SimpleWorker
from rq.exceptions import DequeueTimeout
from rq.job import Job
from rq.serializers import JSONSerializer
from rq.timeouts import JobTimeoutException
from rq.utils import now
from rq.worker import WorkerStatus

from ..collections import CollectionStore
from ..contract import (ERROR_AT_BATCH, ERROR_AT_LOAD, INDEXING, INTERNAL_ERROR, SEARCHING, STAGE_FAILED, TIMEOUT,
                        UPLOAD_EXPIRED, JobRequest, error_body, timing_key, upload_key)
from ..errors import BadRequest, PipelineError, ServiceError
from ..features import parse_features
from ..queue import release_uploads
from .context import WorkerContext
from .pipeline import InferenceRequest, Pipeline

log = logging.getLogger(__name__)

RQ_VERSION = "3.0.0"  # the RQ whose internals this module uses (requirements.txt pins it)
_UNSET = object()
REDIS_WAIT_S = 30.0  # how long a batch waits for a restarting Redis before giving its jobs up
IDLE_POLL_S = 1  # longest blocking pop of an idle worker: a warm stop ends it within about this


def batched_only(request: dict) -> None:
    """The function jobs are queued under (service.contract.JOB_FUNCTION). BatchWorker computes every job's
    outcome itself; anything else that takes a job off the queue and calls its function gets this error."""
    raise RuntimeError("service jobs run only in the batch worker (python worker.py), not as plain RQ jobs")


class BatchJob(Job):
    """A job whose outcome the batch already computed: RQ's perform_job records it like any job's return."""

    outcome: Any = _UNSET

    def _execute(self) -> Any:
        # perform_job stamped started_at just now; the job really started with its batch.
        self.started_at = getattr(self, "batch_started_at", None) or self.started_at
        outcome, self.outcome = self.outcome, _UNSET
        if outcome is _UNSET:  # not taken through a batch: there is no other way to run a job
            return batched_only(**self.kwargs)  # the job's own call, which says where it belongs
        if isinstance(outcome, BaseException):
            raise outcome
        return outcome


class JobFailed(Exception):
    """Raised from a batched job so RQ marks it failed; the reason is in job.meta["error"]."""


# Write one field of a job hash only while the job is `started` by the given worker (KEYS[1]: the job hash;
# ARGV: worker name, field, value). Returns 1 when written.
OWNED_HSET = """
if redis.call('HGET', KEYS[1], 'status') ~= 'started' or redis.call('HGET', KEYS[1], 'worker_name') ~= ARGV[1] then
  return 0
end
redis.call('HSET', KEYS[1], ARGV[2], ARGV[3])
return 1
"""


class _Fence(threading.local):
    """The job whose outcome this thread is writing (set by BatchWorker around perform_job), its worker's name,
    and whether the fence refused a write."""

    job: Job | None = None
    worker: str = ""
    refused: bool = False


_fence = _Fence()


class FencingPipeline(RedisPipeline):
    """A Redis transaction that commits only while the fenced job (if any) is still `started` by its worker: it
    WATCHes the job hash and checks status and owner before MULTI, so a reaper's concurrent failure of the job
    makes our EXEC abort (and the retry then sees the job is no longer ours). Pipelines without a fenced job, or
    without a transaction, behave as redis-py's."""

    def _check_fence(self) -> None:
        job, worker = _fence.job, _fence.worker
        if job is None:
            return
        self.watch(job.key)  # from here until EXEC, any change to the job hash aborts the transaction
        status, owner = self.hmget(job.key, "status", "worker_name")
        if status != b"started" or owner != worker.encode():
            _fence.refused = True
            self.reset()
            raise JobNotOwned(f"job {job.id} is no longer started by {worker} (status {status!r}); its outcome is "
                              "discarded")

    def multi(self) -> None:
        self._check_fence()
        super().multi()

    def execute(self, raise_on_error: bool = True) -> list:
        if self.transaction and not self.explicit_transaction and self.command_stack:
            self._check_fence()
        return super().execute(raise_on_error)


class FencedRedis(Redis):
    """The batch worker's connection: its transactions are FencingPipelines."""

    def pipeline(self, transaction: bool = True, shard_hint: Any = None) -> FencingPipeline:
        return FencingPipeline(self.connection_pool, self.response_callbacks, transaction, shard_hint)


class JobNotOwned(RedisError):
    """A write for a job that the reaper failed (or that changed hands) while this worker ran it."""


def owned_hset(connection: Redis, job: Job, worker_name: str, field: str, value: Any) -> bool:
    """Set one field of the job hash if the job is still `started` by worker_name (atomically, in Lua)."""
    return bool(connection.eval(OWNED_HSET, 1, job.key, worker_name, field, value))


def decoded_bytes(job: Job) -> int:
    """The decoded size of a queued job's images, as the web tier priced them (0 when unknown)."""
    try:
        return sum(int(image.get("decoded_bytes", 0)) for image in job.kwargs["request"]["images"])
    except (KeyError, TypeError, ValueError, AttributeError):
        return 0


def load_uploads(connection: Redis, job: Job, request: JobRequest) -> list[bytes]:
    """The images (or region features) stored with a job, in upload order."""
    stored = connection.hgetall(upload_key(job.id))
    count = len(request.images)
    if count == 0 or len(stored) != count:
        raise PipelineError(UPLOAD_EXPIRED, f"the uploaded {request.inputs} are gone (expired before the job "
                                            "started); submit again", ERROR_AT_LOAD)
    return [stored[str(i).encode()] for i in range(count)]


def load_request(connection: Redis, job: Job) -> InferenceRequest:
    """The pipeline request of an inference job: its parameters and the images (or region features) stored with
    it."""
    request = JobRequest.from_json(job.kwargs["request"])
    uploads = load_uploads(connection, job, request)
    if request.inputs == "features":
        try:  # stored by the web tier as .npz; checked again, the worker does not trust Redis contents
            features = [parse_features(data) for data in uploads]
        except BadRequest as exc:
            raise PipelineError.at(ERROR_AT_LOAD, exc, "stored features: ") from None
        return InferenceRequest([], request.text, request.tasks, request.top_k, request.boxes, features=features)
    return InferenceRequest(uploads, request.text, request.tasks, request.top_k, request.boxes)


def set_progress(connection: Redis, job: Job, stage: str, detail: str = "") -> None:
    """A collection job's progress in job.meta, written only while the job is still ours (owned_hset)."""
    job.meta.update(stage=stage, stage_detail=detail)
    try:
        if not owned_hset(connection, job, job.worker_name, "meta", job._serialize_meta()):
            log.warning("job %s: progress not recorded, the job is no longer this worker's", job.id)
    except RedisError as exc:
        log.warning("job %s: progress not recorded: redis unavailable (%s)", job.id, exc)


def run_collection_job(pipeline: Pipeline, connection: Redis, job: Job, request: JobRequest) -> dict:
    """One collection job (kind collection_add or collection_search) with the worker's models; a failure is a
    PipelineError. An add's pending entries (service.collections) are removed as its images are indexed, and all
    of them when it fails."""
    from .collections import index_images, search  # torch: only in the worker

    try:
        store = CollectionStore(connection, request.collection)  # None too: check_name refuses it
    except BadRequest as exc:
        raise PipelineError.at(ERROR_AT_LOAD, exc) from None
    if request.kind == "collection_search":
        set_progress(connection, job, SEARCHING)
        try:
            result = search(pipeline, store, request.text, request.top_k, request.tasks[0], ground=request.ground,
                            first_stage_above=request.first_stage_above, rerank_top=request.rerank_top)
        except ServiceError as exc:  # an unknown task, an image deleted while the search read it
            raise PipelineError.at(SEARCHING, exc) from None
        return {"collection": store.name, **result}
    try:
        uploads = load_uploads(connection, job, request)
        image_ids, added = [], 0
        set_progress(connection, job, INDEXING, f"0/{len(uploads)}")
        for done, data in enumerate(uploads, 1):
            try:
                try:
                    (image_id, new), = index_images(pipeline, store, [data])
                except (RedisConnectionError, RedisTimeoutError):
                    # Redis went away (a restart with its append-only file takes seconds): wait for it and index
                    # this image again; images already stored are a no-op, so nothing is stored twice.
                    if not wait_for_redis(connection, REDIS_WAIT_S):
                        raise
                    log.warning("job %s: Redis was unavailable while indexing image %d; indexed after it came back",
                                job.id, done - 1)
                    (image_id, new), = index_images(pipeline, store, [data])
            except (RedisConnectionError, RedisTimeoutError):
                raise  # Redis stayed away: an outage, not a bad image
            except Exception as exc:  # an undecodable image (its code and message) and the like
                code = getattr(exc, "code", None) or INTERNAL_ERROR
                raise PipelineError(code, f"image {done - 1}: {exc}", INDEXING) from None
            image_ids.append(image_id)
            added += new
            store.clear_pending(job.id, [image_id])
            set_progress(connection, job, INDEXING, f"{done}/{len(uploads)}")
        if added:
            store.register()  # counted again if the collection was deleted while this job ran
        return {"collection": store.name, "image_ids": image_ids, "added": added, "images": store.info().images}
    except BaseException:
        try:
            store.clear_pending(job.id)
            store.forget_if_empty()
        except RedisError:
            pass
        raise


def run_batch(pipeline: Pipeline, connection: Redis, batch: list[Job]) -> dict[str, Any]:
    """job id -> result dict, or the exception that fails that job (its reason saved in job.meta["error"]).
    Inference jobs run together (Pipeline.run_many); collection jobs after them, one at a time."""
    outcomes: dict[str, Any] = {}
    requests, live = [], []
    collection_jobs: list[tuple[Job, JobRequest]] = []
    for job in batch:
        try:
            parsed = JobRequest.from_json(job.kwargs["request"])
            if parsed.kind != "inference":
                collection_jobs.append((job, parsed))
                continue
            try:
                request = load_request(connection, job)
            except RedisError:  # Redis restarting: wait for it once rather than fail the job at once
                if not wait_for_redis(connection, REDIS_WAIT_S):
                    raise
                request = load_request(connection, job)
            requests.append(request)
            live.append(job)
        except PipelineError as exc:
            outcomes[job.id] = exc
        except Exception as exc:  # a malformed job must not fail its partners
            log.exception("job %s: cannot load its request", job.id)
            outcomes[job.id] = PipelineError(INTERNAL_ERROR, f"{type(exc).__name__}: {exc}", ERROR_AT_LOAD)

    def stage(name: str, detail: str) -> None:
        try:  # progress is best effort: a Redis blip must not fail the batch
            with connection.pipeline(transaction=False) as pipe:  # one round trip for the whole batch
                for job in live:  # written only while the job is still ours (OWNED_HSET)
                    job.meta.update(stage=name, stage_detail=detail)
                    pipe.eval(OWNED_HSET, 1, job.key, job.worker_name, "meta", job._serialize_meta())
                pipe.execute()
        except RedisError as exc:
            log.warning("stage %s not recorded: redis unavailable (%s)", name, exc)

    started = time.perf_counter()
    if live:
        results = pipeline.run_many(requests, on_stage=stage)
        run_s = round(time.perf_counter() - started, 4)
        for job, result in zip(live, results):
            if isinstance(result, PipelineError):
                outcomes[job.id] = result
                continue
            timings = result["timings"]
            if job.enqueued_at and job.started_at:
                waited = (job.started_at - job.enqueued_at).total_seconds()
                timings[timing_key("queue_wait")] = round(max(0.0, waited), 4)
            timings[timing_key("run")] = run_s
            result["batch_size"] = len(batch)  # jobs this worker took together
            outcomes[job.id] = result
    for job, request in collection_jobs:
        try:
            outcomes[job.id] = run_collection_job(pipeline, connection, job, request)
        except PipelineError as exc:
            outcomes[job.id] = exc
        except Exception as exc:  # Redis gone, a damaged record: this job fails, not the batch
            log.exception("job %s: collection job failed", job.id)
            outcomes[job.id] = PipelineError(INTERNAL_ERROR, f"{type(exc).__name__}: {exc}", ERROR_AT_BATCH)
    return outcomes


def wait_for_redis(connection: Redis, limit_s: float) -> bool:
    """Wait up to limit_s for Redis to answer (a restart with its append-only file takes seconds)."""
    deadline = time.monotonic() + limit_s
    while True:
        try:
            return bool(connection.ping())
        except RedisError:
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.5)


def _record_error(job: Job, error: dict) -> None:
    job.meta["error"] = error
    job.meta.update(stage=STAGE_FAILED)
    owned_hset(job.connection, job, job.worker_name, "meta", job._serialize_meta())


class BatchWorker(SimpleWorker):
    """SimpleWorker that runs what it dequeues in batches, with the worker's context passed in."""

    job_class = BatchJob

    def __init__(self, queues: list[Queue], context: WorkerContext, **kwargs: Any):
        fenced = FencedRedis(connection_pool=context.connection.connection_pool)
        super().__init__(queues, connection=fenced, serializer=JSONSerializer, **kwargs)
        self.context = context

    def request_stop(self, signum: Any, frame: Any) -> None:
        """Warm stop (SIGTERM/SIGINT): noted, never raised. RQ's own raises StopRequested at once in a worker that is
        not busy, wherever the signal lands, also between the pop that has just moved a job into the intermediate
        queue and that job's start: the job then stays there until RQ fails it as stuck, two maintenance passes
        (10+ minutes) later. A scale-down's SIGTERM hits that window now and then. Here the idle pop waits at most
        IDLE_POLL_S at a time and sees the stop; a job already popped runs first. A second signal is RQ's cold
        stop. Nothing here talks to Redis: the interrupted code may hold the connection pool's lock."""
        self.context.stop.set()  # remembered across restarts: the outer loop (service.worker.main) ends
        self._shutdown_requested_date = now()  # RQ's cold stop ignores a duplicate signal within 1 s of this
        signal.signal(signal.SIGINT, self.request_force_stop)
        signal.signal(signal.SIGTERM, self.request_force_stop)
        self.handle_warm_shutdown_request()
        self._stop_requested = True

    def teardown(self) -> None:
        """RQ's, with the listener thread of the worker's channel stopped even when Redis is down: RQ deregisters the
        worker first, and when that fails (an outage) the thread would stay, retrying every 2 s for the life of the
        process, one more after each outage that ends an RQ worker."""
        try:
            super().teardown()
        finally:
            listener = getattr(self, "pubsub_thread", None)
            if listener is not None and listener.is_alive():
                listener.stop()  # it ends at its next turn (RQ's handler of a failed read waits 2 s first)

    def _install_signal_handlers(self) -> None:
        super()._install_signal_handlers()
        # A signal that came after the loop's own handler (service.worker.main) and before these: stop now.
        if self.context.stop.is_set():
            self._stop_requested = True

    def dequeue_job_and_maintain_ttl(self, timeout: int | None,
                                     max_idle_time: int | None = None) -> tuple[Job, Queue] | None:
        """RQ's idle wait for a job, its steps in its order, but in blocking pops of at most IDLE_POLL_S, so that a
        noted stop (request_stop) ends it: None then. A Redis outage is waited out with RQ's growing waits, on the
        stop event, which a stop ends. RQ's burst mode (`timeout=None`) and `max_idle_time`, which the service does
        not use, are RQ's own."""
        if timeout is None or max_idle_time is not None:
            return super().dequeue_job_and_maintain_ttl(timeout, max_idle_time)
        self.set_state(WorkerStatus.IDLE)
        self.procline("Listening on " + ",".join(self.queue_names()))
        outage_wait = 1.0
        while not self._stop_requested:
            try:
                self.heartbeat()
                if self.should_run_maintenance_tasks:
                    self.run_maintenance_tasks()
                taken = self.queue_class.dequeue_any(
                    self._ordered_queues, min(timeout, IDLE_POLL_S), connection=self.connection,
                    job_class=self.job_class, serializer=self.serializer, death_penalty_class=self.death_penalty_class)
            except DequeueTimeout:
                continue
            except (RedisConnectionError, RedisTimeoutError) as exc:
                log.error("worker %s: redis unavailable while idle (%s); retrying in %.0f s", self.name, exc,
                          outage_wait)
                self.context.stop.wait(outage_wait)
                outage_wait = min(outage_wait * self.exponential_backoff_factor, self.max_connection_wait_time)
                continue
            if taken is None:  # with a timeout RQ raises DequeueTimeout instead; RQ's own loop checks this too
                continue
            job, queue = taken
            self.reorder_queues(reference_queue=queue)
            job.redis_server_version = self.get_redis_server_version()
            self.log.info("Worker %s: %s: %s", self.name, queue.name, job.id)
            self.heartbeat()
            return taken
        return None

    def take_partners(self, first: tuple[Job, Queue]) -> list[tuple[Job, Queue]]:
        """Up to BATCH_MAX_JOBS jobs, but no more once their decoded images reach MAX_DECODED_BYTES_PER_BATCH (so
        a batch holds at most that plus one request's images: docs/OPERATIONS.md)."""
        settings = self.context.settings
        batch = [first]
        held = decoded_bytes(first[0])
        deadline = time.monotonic() + settings.batch_max_wait_ms / 1000.0
        while (len(batch) < settings.batch_max_jobs and held < settings.max_decoded_bytes_per_batch
               and not self._stop_requested):
            taken = Queue.dequeue_any(self._ordered_queues, None, connection=self.connection,
                                      job_class=self.job_class, serializer=self.serializer,
                                      death_penalty_class=self.death_penalty_class)
            if taken is not None:
                batch.append(taken)
                held += decoded_bytes(taken[0])
                continue
            if time.monotonic() >= deadline:
                break
            time.sleep(0.001)
        return batch

    def prepare_job_execution(self, job: Job, remove_from_intermediate_queue: bool = False) -> None:
        # perform_job calls this again for a job execute_job already prepared: skipping the second call saves
        # a round trip per job and keeps started_at at the start of the batch.
        if getattr(job, "batch_prepared", False):
            return
        super().prepare_job_execution(job, remove_from_intermediate_queue)
        job.batch_prepared, job.batch_started_at = True, job.started_at

    def execute_job(self, job: Job, queue: Queue) -> None:
        # Busy from the first job on: a warm stop (SIGTERM) while the batch waits for partners then ends the wait
        # and the batch runs, where RQ, seeing an idle worker, would stop at once and strand the jobs already
        # taken in its intermediate queue (failed later as "stuck").
        self.set_state(WorkerStatus.BUSY)
        batch = self.take_partners((job, queue))
        executions = []
        for member, _ in batch:
            executions.append(self.prepare_execution(member))
            self.prepare_job_execution(member, remove_from_intermediate_queue=len(self.queues) == 1)
        members = [member for member, _ in batch]
        self.context.metrics.batch(len(members))
        # The batch is killed after the LONGEST job timeout (-1: none), so a job with a short timeout cannot
        # take its partners down; afterwards each job whose own timeout the batch overran fails as timeout.
        limits = {m.id: m.timeout or self.queue_class.DEFAULT_TIMEOUT for m in members}
        timeout = -1 if any(t == -1 for t in limits.values()) else max(limits.values())
        started = time.monotonic()
        try:
            with self.death_penalty_class(timeout, JobTimeoutException, job_id=job.id):
                outcomes = run_batch(self.context.pipeline, self.connection, members)
        except JobTimeoutException as exc:
            outcomes = {m.id: exc for m in members}
        except Exception as exc:
            log.exception("batch of %d failed", len(members))
            outcomes = {m.id: PipelineError(INTERNAL_ERROR, f"{type(exc).__name__}: {exc}", ERROR_AT_BATCH)
                        for m in members}
        elapsed = time.monotonic() - started
        # Results are computed: if Redis is restarting, wait for it rather than lose them (bounded).
        wait_for_redis(self.connection, REDIS_WAIT_S)
        for (member, member_queue), execution in zip(batch, executions):
            if not self.still_owns(member):
                self.discard(member, "before its outcome was written")
                continue
            outcome = outcomes.get(member.id)
            if isinstance(outcome, dict) and 0 < limits[member.id] < elapsed:
                outcome = JobTimeoutException(f"the batch took {elapsed:.1f} s")
            if isinstance(outcome, PipelineError):
                _record_error(member, outcome.to_dict())
                outcome = JobFailed(f"{outcome.code}: {outcome.message}")
            elif isinstance(outcome, JobTimeoutException):
                _record_error(member, error_body(TIMEOUT, f"the job's batch ran longer than its timeout of "
                                                          f"{limits[member.id]} s"))
            member.outcome = outcome
            _fence.job, _fence.worker, _fence.refused = member, self.name, False
            try:
                self.perform_job(member, member_queue, execution)
            finally:
                refused, _fence.job = _fence.refused, None
                release_uploads(self.connection, self.context.settings, member.id)
            if refused:
                self.discard(member, "while its outcome was being written")
            else:
                self.context.metrics.job_done(outcome, member.meta.get("error"))
        self.set_state(WorkerStatus.IDLE)

    def still_owns(self, job: Job) -> bool:
        status, owner = self.connection.hmget(job.key, "status", "worker_name")
        return status == b"started" and owner == self.name.encode()

    def discard(self, job: Job, when: str) -> None:
        """The reaper failed this job while we ran it (we were paused or cut off past the heartbeat TTL): the
        job stays failed; what we computed is dropped."""
        log.warning("job %s: discarding this worker's outcome, computed after the job was failed as orphaned "
                    "(%s)", job.id, when)
        self.context.metrics.discarded()
        try:
            release_uploads(self.connection, self.context.settings, job.id)
        except RedisError:
            pass
