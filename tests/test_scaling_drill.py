"""The queue-driven scaling drill (bench/scaling_drill.py) with real processes: a private Redis, `python worker.py`
workers on the tiny bundle, and a controller that sets the worker count as KEDA's redis scaler does for the
ScaledObject of deploy/k8s/ (ceil(LLEN rq:queue:<QUEUE_NAME> / listLength) clamped to [min, max]), stopping workers
with SIGTERM on scale-down. Every job must end finished exactly once, the queue must drain, and a worker stopped
while it runs a job must finish that job and exit 0.

Waits are on conditions (registry counts, process exits, RQ's worker records), never fixed sleeps."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))
from scaling_drill import Drill, keda_desired  # noqa: E402
from stack import TIME_SCALE  # noqa: E402

pytestmark = pytest.mark.slow
TARGET, MIN, MAX = 50, 1, 3


def test_keda_formula():
    assert keda_desired(0, 20, 1, 8) == 1  # never below minReplicaCount
    assert keda_desired(1, 20, 1, 8) == 1
    assert keda_desired(20, 20, 1, 8) == 1
    assert keda_desired(21, 20, 1, 8) == 2  # ceil
    assert keda_desired(1000, 20, 1, 8) == 8  # never above maxReplicaCount
    assert keda_desired(0, 4, 0, 4) == 0


@pytest.fixture(scope="module")
def drill(tmp_path_factory):
    drill = Drill(tmp_path_factory.mktemp("drill"), batch_max_jobs=4, log=lambda line: print(line))
    yield drill
    drill.close()


def test_burst_scales_up_and_back_down_and_every_job_finishes_once(drill):
    jobs = 300
    outcome = drill.run_keda(jobs, TARGET, MIN, MAX, window=2.0, timeout=300 * TIME_SCALE)
    # verify() inside run_keda: one result per job, all finished, queue and started registry empty.
    assert outcome.statuses == {"finished": jobs}
    assert sum(outcome.per_worker.values()) == jobs
    assert outcome.max_workers >= 2 and outcome.scale_ups >= 1, outcome.timeline
    assert outcome.scale_downs == outcome.scale_ups and len(drill.workers) == MIN  # back to minReplicaCount
    for _, length, desired, _ in outcome.timeline:
        assert desired == keda_desired(length, TARGET, MIN, MAX)
    assert outcome.timeline[0][2] > MIN  # the burst asked for more workers
    # A worker with its models loaded shuts down warm (exit 0); one still loading dies of the signal, owning no job.
    assert all(code == 0 for code, ready in outcome.exit_codes if ready), outcome.exit_codes
    assert len(outcome.exit_codes) == outcome.scale_downs


def test_sigterm_of_a_busy_worker_finishes_its_job(drill):
    result = drill.run_sigterm_mid_batch(40, workers=2, timeout=120 * TIME_SCALE)
    assert result["statuses"] == {"finished": 40}
    assert result["per_worker"][result["stopped"]] >= 1


def test_a_drill_that_does_not_drain_says_where_the_jobs_are(drill):
    from service.localstack import wait_until

    drill.scale_to(0)  # SIGTERM to the last worker
    assert wait_until(lambda: not drill.reap() and not drill.stopping, 60 * TIME_SCALE, 0.05)
    ids = drill.submit(2)
    assert drill.where(ids) == ("statuses {'queued': 2}, 2 queued, 0 in the intermediate queue, 0 started, "
                                "0 workers, 0 stopping")
