"""The Batch API end to end: a real `joulegate serve` process in front of the fake upstream,
driven by the official SDK, with the gateway's batch clock read from a file the test
writes (``JOULEGATE_BATCH_CLOCK_FILE``, a test aid).

A batch submitted at 00:30 on a site whose grid is cleanest at 03:00 waits for 03:00, runs
there, survives a gateway restart in the middle (SIGTERM: the request in flight finishes,
the next process runs only the requests not done), and every request reaches the
upstream exactly once (the fake upstream records each request id it gets). Its CO₂
figures match a hand computation.
"""

from __future__ import annotations

import json
import os
import signal
from collections import Counter
from datetime import UTC, datetime

import pytest

from gateway.batches.clock import CLOCK_FILE_ENV

from .conftest import FakeUpstream, Gateway, priced_policy, wait_until

pytestmark = pytest.mark.e2e

SUBMIT = datetime(2026, 3, 2, 0, 30, tzinfo=UTC)
CLEANEST = datetime(2026, 3, 2, 3, 0, tzinfo=UTC)
LINES = 8
#: The fake upstream's usage (12 + 12 tokens) on tier big (2 J per token).
LINE_JOULES = 48.0
PUE = 1.5


@pytest.fixture
def recording_upstream(tmp_path):
    record = tmp_path / "upstream-requests.txt"
    record.touch()
    up = FakeUpstream(delay_ms=400, options=("--record", str(record)))
    yield up, record
    up.stop()


def upstream_counts(record) -> Counter:
    return Counter(line for line in record.read_text().splitlines() if line)


def test_sdk_batch_waits_for_the_clean_hour_and_survives_a_restart(tmp_path,
                                                                   recording_upstream):
    upstream, record = recording_upstream
    policy = priced_policy(upstream.url, {})
    policy["sites"] = {"grid": {"pue": PUE, "carbon": {"schedule": {0: 400, 3: 100, 4: 300}}}}
    policy["backends"]["up-big"]["site"] = "grid"
    policy["batches"] = {"concurrency": 1, "poll_interval_s": 0.2}
    policy["state_dir"] = str(tmp_path / "state")
    clock = tmp_path / "clock"
    clock.write_text(SUBMIT.isoformat())
    gw = Gateway(policy, tmp_path, env={CLOCK_FILE_ENV: str(clock)}).start()
    try:
        client = gw.client()
        requests = tmp_path / "requests.jsonl"
        requests.write_text("".join(json.dumps({
            "custom_id": f"req-{i}", "method": "POST", "url": "/v1/chat/completions",
            "body": {"model": "big", "messages": [{"role": "user", "content": f"task {i}"}],
                     "max_tokens": 16}}) + "\n" for i in range(LINES)))
        with requests.open("rb") as f:
            uploaded = client.files.create(file=f, purpose="batch")
        assert uploaded.purpose == "batch" and uploaded.bytes == requests.stat().st_size
        batch = client.batches.create(input_file_id=uploaded.id,
                                      endpoint="/v1/chat/completions",
                                      completion_window="24h", metadata={"run": "e2e"})
        assert batch.status == "validating"
        assert batch.model_extra["carbon"]["scheduled_at"] == int(CLEANEST.timestamp())
        waiting = wait_until(lambda: (b := client.batches.retrieve(batch.id)).status
                             == "in_progress" and b, 30, what="in_progress")
        assert waiting.request_counts.completed == 0 and upstream_counts(record) == {}

        clock.write_text(CLEANEST.isoformat())  # the clean hour comes
        wait_until(lambda: client.batches.retrieve(batch.id).request_counts.completed >= 2,
                   60, what="two requests done")
        gw.stop()  # mid-batch: SIGTERM, the request in flight finishes
        stopped_with = len(upstream_counts(record))
        assert 2 <= stopped_with < LINES, "the restart did not land mid-batch"

        gw.start()
        client = gw.client()
        done = wait_until(lambda: (b := client.batches.retrieve(batch.id)).status
                          in ("completed", "failed", "expired", "cancelled") and b,
                          60, what="the batch to end")
        assert done.status == "completed", done
        assert (done.request_counts.total, done.request_counts.completed,
                done.request_counts.failed) == (LINES, LINES, 0)
        assert done.completed_at == int(CLEANEST.timestamp())
        assert done.metadata == {"run": "e2e"} and done.error_file_id is None

        # No request lost, none run twice: each reached the upstream exactly once.
        ids = [f"batch_req_{batch.id.removeprefix('batch_')}_{i}" for i in range(LINES)]
        assert upstream_counts(record) == Counter(ids)
        out = [json.loads(line) for line in client.files.content(done.output_file_id)
               .text.splitlines()]
        assert [line["custom_id"] for line in out] == [f"req-{i}" for i in range(LINES)]
        assert all(line["response"]["status_code"] == 200 for line in out)
        assert [line["response"]["request_id"] for line in out] == ids
        assert all(line["response"]["body"]["usage"]["energy_joules"] == LINE_JOULES
                   for line in out)

        # By hand: 8 x 48 J x PUE 1.5 = 576 facility J = 1.6e-4 kWh, at 100 g/kWh (03:00)
        # against 400 g/kWh had it run when submitted (00:30).
        carbon = done.model_extra["carbon"]
        kwh = LINES * LINE_JOULES * PUE / 3.6e6
        assert carbon["energy_joules"] == pytest.approx(LINES * LINE_JOULES)
        assert carbon["co2_g"] == pytest.approx(kwh * 100, abs=1e-6)
        assert carbon["co2_g_if_immediate"] == pytest.approx(kwh * 400, abs=1e-6)
        assert carbon["co2_g_avoided"] == pytest.approx(kwh * 300, abs=1e-6)
    finally:
        gw.stop()


def test_after_a_crash_the_next_process_takes_the_batch_over(tmp_path, recording_upstream):
    """SIGKILL mid-batch: nothing written is lost; once the dead process's claim lapses
    (``batches.lease_s``) the next one runs every request not done. Only the request that was
    in flight when the process died may reach the upstream twice (it was sent, its result
    never written); every request is in the output once."""
    upstream, record = recording_upstream
    policy = priced_policy(upstream.url, {})
    policy["batches"] = {"concurrency": 1, "poll_interval_s": 0.2, "lease_s": 5}
    policy["state_dir"] = str(tmp_path / "state")
    gw = Gateway(policy, tmp_path).start()
    try:
        client = gw.client()
        lines = "".join(json.dumps({
            "custom_id": f"req-{i}", "method": "POST", "url": "/v1/completions",
            "body": {"model": "big", "prompt": f"task {i}", "max_tokens": 16}}) + "\n"
            for i in range(LINES))
        uploaded = client.files.create(file=("in.jsonl", lines.encode()), purpose="batch")
        batch = client.batches.create(input_file_id=uploaded.id, endpoint="/v1/completions",
                                      completion_window="24h")
        wait_until(lambda: client.batches.retrieve(batch.id).request_counts.completed >= 2,
                   60, what="two requests done")
        os.killpg(gw.proc.pid, signal.SIGKILL)
        gw.proc.wait(timeout=30)
        gw.start()
        client = gw.client()
        done = wait_until(lambda: (b := client.batches.retrieve(batch.id)).status
                          == "completed" and b, 90, what="the batch to complete")
        assert done.request_counts.completed == LINES and done.request_counts.failed == 0
        out = [json.loads(line) for line in client.files.content(done.output_file_id)
               .text.splitlines()]
        assert [line["custom_id"] for line in out] == [f"req-{i}" for i in range(LINES)]
        counts = upstream_counts(record)
        ids = [f"batch_req_{batch.id.removeprefix('batch_')}_{i}" for i in range(LINES)]
        assert set(counts) == set(ids)
        assert sum(counts.values()) - LINES <= 1  # concurrency 1: at most one sent twice
    finally:
        gw.stop()
