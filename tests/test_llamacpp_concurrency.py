"""Several sequences on one llama.cpp model: batched decode gives the tokens sequential decode
gives, cancelling one leaves the others running, and energy is split exactly under
concurrency, with nothing charged to a request while it waits for a slot."""

from __future__ import annotations

import asyncio
import os
import random
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from backends import GenerationRequest, Usage
from backends.llamacpp import LlamaCppBackend, LlamaCppSettings
from gateway.energy import Meter, Reading
from gateway.energy.attribution import Attribution, EnergyDevice, split
from gateway.energy.estimated import CpuTimeMeter

from .conftest import SMALL_MODEL, Gateway, llamacpp_policy

#: Plain completions whose first tokens differ: no prompt shares a cached prefix with another.
PROMPTS = ["def fibonacci(n):", "class Stack:\n    def __init__(self):",
           "import os\n\ndef list_python_files(path):"]
#: Run after them: the shared KV cache then holds their cells under the other slots' ids.
LATER = "def merge_sorted(a, b):"
MAX_TOKENS = 8


# -- the attribution arithmetic -----------------------------------------------------------


@pytest.mark.unit
def test_split_is_by_work_and_a_request_that_has_not_started_gets_nothing():
    assert split(10.0, [1.0, 3.0], [True, True]) == [2.5, 7.5]
    assert split(10.0, [0.0, 2.0], [False, True]) == [0.0, 10.0]  # the queued one did nothing
    # No work in the interval (a decode step between two ticks): the started requests share
    # it; the one still waiting for a slot gets nothing.
    assert split(9.0, [0.0, 0.0, 0.0], [True, False, True]) == [4.5, 0.0, 4.5]
    # Nobody has started (an upstream that reports tokens only at the end): all share.
    assert split(6.0, [0.0, 0.0], [False, False]) == [3.0, 3.0]
    rng = random.Random(3)
    for _ in range(500):
        n = rng.randint(1, 6)
        works = [rng.choice([0.0, rng.uniform(0, 5)]) for _ in range(n)]
        started = [rng.random() < 0.5 for _ in range(n)]
        pool = rng.uniform(0, 100)
        assert sum(split(pool, works, started)) == pytest.approx(pool, rel=1e-12)


class ScriptedMeter(Meter):
    """Readings set by the test: the hardware boundary, scripted."""

    kind = "scripted"

    def __init__(self) -> None:
        self.joules = 0.0

    def read(self) -> Reading:
        return Reading(self.joules)


@pytest.mark.unit
def test_a_request_waiting_for_a_slot_spends_no_joules():
    meter = ScriptedMeter()
    dev = EnergyDevice("host", meter)
    dev.start()
    running, queued = Usage(), Usage()
    s_run = dev.open(running, weights=Attribution(0.1))
    running.prompt_tokens = 100  # the running request reads its prompt ...
    meter.joules = 5.0
    dev.tick()
    s_wait = dev.open(queued, weights=Attribution(0.1))  # ... and the next one queues behind it
    meter.joules = 9.0  # a decode step under way: no token finished in this interval
    dev.tick()
    running.completion_tokens = 4
    meter.joules = 12.0
    dev.tick()
    assert s_wait.joules == 0.0 and s_run.joules == pytest.approx(12.0)
    assert dev.close_share(s_run) == pytest.approx(12.0)
    queued.prompt_tokens = 50  # its turn: it starts working
    meter.joules = 14.0
    dev.tick()
    queued.completion_tokens = 2
    meter.joules = 16.0
    assert dev.close_share(s_wait) == pytest.approx(4.0)
    assert dev.check_invariant() == pytest.approx(0.0, abs=1e-9)


# -- the real model -------------------------------------------------------------------------


def _completion(prompt: str) -> GenerationRequest:
    return GenerationRequest(model="m", prompt=prompt, max_tokens=MAX_TOKENS, temperature=0,
                             seed=1)


async def _started(slots: int) -> LlamaCppBackend:
    backend = LlamaCppBackend("q", LlamaCppSettings(model=SMALL_MODEL, n_ctx=512, slots=slots,
                                                    n_threads=2, queue_timeout_s=120))
    await backend.start()
    return backend


@pytest.mark.e2e
def test_batched_greedy_decode_gives_the_tokens_of_sequential_decode(small_model_path):
    import llama_cpp

    reference = llama_cpp.Llama(model_path=str(small_model_path), n_ctx=512, n_threads=2,
                                verbose=False)
    try:  # llama-cpp-python's own loop, one context, one sequence at a time
        expected = [reference.create_completion(p, max_tokens=MAX_TOKENS, temperature=0,
                                                seed=1)["choices"][0]["text"]
                    for p in [*PROMPTS, LATER]]
    finally:
        reference.close()

    async def sequential() -> list[str]:
        backend = await _started(slots=1)
        try:
            return [(await backend.complete(_completion(p))).text for p in [*PROMPTS, LATER]]
        finally:
            await backend.close()

    async def batched() -> tuple[list[str], list[Usage], int, dict[str, float], str]:
        backend = await _started(slots=len(PROMPTS))
        meter = CpuTimeMeter(watts_per_core=10.0)
        device = EnergyDevice("host-cpu", meter, interval_s=0.05)
        device.start()
        try:
            requests = [_completion(p) for p in PROMPTS]
            shares = [device.open(r.progress, 1.0, Attribution(0.1)) for r in requests]
            steps0 = backend._engine.steps if backend._engine else 0

            async def one(request: GenerationRequest, share) -> str:
                try:
                    return (await backend.complete(request)).text
                finally:
                    device.close_share(share)

            texts = await asyncio.gather(*(one(r, s) for r, s in zip(requests, shares, strict=True)))
            steps = (backend._engine.steps if backend._engine else 0) - steps0
            device.tick()
            totals = device.totals
            energy = {"shares": sum(s.joules for s in shares), "meter": totals.meter_j,
                      "idle": totals.idle_j, "min_share": min(s.joules for s in shares)}
            # A new prompt in a slot beside the finished ones' cached cells sees none of them.
            later = (await backend.complete(_completion(LATER))).text
            return list(texts), [r.progress for r in requests], steps, energy, later
        finally:
            device.close()
            await backend.close()

    one_by_one = asyncio.run(sequential())
    together, usages, steps, energy, later = asyncio.run(batched())
    assert all(text for text in expected)
    assert one_by_one == expected
    assert [*together, later] == expected
    assert all(u.completion_tokens == MAX_TOKENS and u.prompt_tokens > 2 for u in usages)
    # The three sequences shared their decode steps (one at a time would take 3 x 8).
    assert steps < len(PROMPTS) * MAX_TOKENS
    # Per-request shares of the CPU-time estimate add up to the meter (idle aside).
    assert energy["min_share"] > 0
    assert energy["shares"] + energy["idle"] == pytest.approx(energy["meter"], rel=1e-9)


@pytest.mark.e2e
def test_each_sequence_stops_at_its_own_context_window(small_model_path):
    """The slots share one KV cache of ``slots x n_ctx`` cells: llama.cpp would let one
    sequence grow past ``n_ctx``, the backend does not."""
    async def body() -> list[tuple[int, int, str | None]]:
        backend = LlamaCppBackend("q", LlamaCppSettings(model=SMALL_MODEL, n_ctx=128, slots=2,
                                                        n_threads=2, queue_timeout_s=120))
        await backend.start()
        try:
            requests = [GenerationRequest(model="m", prompt=f"{i}, " * 8, max_tokens=400,
                                          temperature=0, seed=1) for i in range(2)]
            results = await asyncio.gather(*(backend.complete(r) for r in requests))
            return [(r.usage.prompt_tokens, r.usage.completion_tokens, r.finish_reason)
                    for r in results]
        finally:
            await backend.close()

    for prompt_tokens, completion_tokens, finish in asyncio.run(body()):
        assert prompt_tokens > 8
        assert prompt_tokens + completion_tokens <= 128
        if finish == "length":  # not an end of text of its own before the window
            assert prompt_tokens + completion_tokens >= 120


@pytest.mark.e2e
def test_cancelling_one_sequence_leaves_the_batch_running(small_model_path):
    async def body() -> None:
        backend = await _started(slots=2)
        try:
            long = GenerationRequest(model="m", messages=[
                {"role": "user", "content": "Count to 500."}], max_tokens=1000, temperature=0)
            stream = backend.stream(long)
            assert (await anext(stream)).text is not None
            short = asyncio.create_task(backend.complete(_completion(PROMPTS[0])))
            for _ in range(600):  # the short one joins while the long one runs
                if short.done() or long.progress.completion_tokens >= 3:
                    break
                await asyncio.sleep(0.05)
            await stream.aclose()  # the client went away
            result = await asyncio.wait_for(short, timeout=120)
            assert result.usage.completion_tokens == MAX_TOKENS
            assert long.progress.completion_tokens < 200
            for _ in range(100):
                if (await backend.health()).info["busy"] == 0:
                    break
                await asyncio.sleep(0.05)
            assert (await backend.health()).info == {"slots": 2, "busy": 0, "queued": 0}
        finally:
            await backend.close()

    asyncio.run(body())


@pytest.mark.e2e
def test_a_repeated_prompt_is_read_from_the_cache(small_model_path):
    async def body() -> tuple[int, int, str, str]:
        backend = await _started(slots=2)
        try:
            assert backend._engine is not None
            first = await backend.complete(_completion(PROMPTS[2]))
            decoded = backend._engine.decoded
            again = await backend.complete(_completion(PROMPTS[2]))
            return (backend._engine.decoded - decoded, again.usage.prompt_tokens, first.text,
                    again.text)
        finally:
            await backend.close()

    decoded, prompt_tokens, first, again = asyncio.run(body())
    assert prompt_tokens > 5  # usage still counts the whole prompt
    # Only the prompt's last token is read again (for fresh logits), then 7 tokens are fed
    # back: the 8th is sampled and never decoded.
    assert decoded == 1 + (MAX_TOKENS - 1)
    assert first and again


# -- through the gateway ------------------------------------------------------------------

WATTS_PER_CORE = 10.0


def _scrape(gw: Gateway) -> dict[str, float]:
    """Attributed and idle joules, summed over their labels."""
    text = httpx.get(f"{gw.url}/metrics", timeout=10).text
    sums = {"joulegate_energy_joules_total": 0.0, "joulegate_idle_energy_joules_total": 0.0}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name in sums:
                sums[sample.name] += sample.value
    return sums


def _cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@pytest.mark.e2e
def test_concurrent_requests_joules_sum_to_the_meter(tmp_path, small_model_path):
    policy = llamacpp_policy()
    policy["backends"]["q05"].update(slots=3)
    policy["backends"]["q05"]["energy"] = {"meter": "estimated", "watts_per_core": WATTS_PER_CORE,
                                           "idle_watts": 0.0, "interval_s": 0.1}
    gw = Gateway(policy, tmp_path).start()
    try:
        client = gw.client()
        client.completions.create(model="small", prompt="x", max_tokens=1)  # warm
        assert gw.proc is not None
        _scrape(gw)
        asyncio.run(asyncio.sleep(0.5))  # a few ticks: everything so far is on the books
        before, cpu0 = _scrape(gw), _cpu_seconds(gw.proc.pid)

        def one(prompt: str):
            return client.completions.create(model="small", prompt=prompt,
                                             max_tokens=MAX_TOKENS, temperature=0)

        with ThreadPoolExecutor(len(PROMPTS)) as pool:
            answers = list(pool.map(one, PROMPTS))
        asyncio.run(asyncio.sleep(0.5))
        cpu1, after = _cpu_seconds(gw.proc.pid), _scrape(gw)
    finally:
        gw.stop()
    reported = [a.usage.model_dump()["energy_joules"] for a in answers]
    assert all(j > 0 for j in reported)
    assert all(a.usage.completion_tokens == MAX_TOKENS for a in answers)
    attributed = (after["joulegate_energy_joules_total"]
                  - before["joulegate_energy_joules_total"])
    idle = (after["joulegate_idle_energy_joules_total"]
            - before["joulegate_idle_energy_joules_total"])
    # What the requests were told is what the books say, to the 1e-6 J responses round to.
    assert sum(reported) == pytest.approx(attributed, abs=len(reported) * 1e-6)
    # And with the idle between them, it is the meter: the gateway's CPU time x W/core (up
    # to the kernel's tick of CPU accounting and the two scrapes' own CPU).
    meter = (cpu1 - cpu0) * WATTS_PER_CORE
    assert attributed + idle == pytest.approx(meter, rel=0.03, abs=0.05 * WATTS_PER_CORE)
