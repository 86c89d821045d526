#!/usr/bin/env python3
"""Mixed real-client traffic on the default local tiers: does every answer come out right?

Starts ``joulegate serve`` on the embedded default policy's backends (the 0.5B and 1.5B
GGUFs in-process, wordllama), with a joule budget on the tenant and the access log on, then
sends it, from ``--concurrency`` workers for ``--duration`` seconds, the requests today's
clients send, with the ``openai`` SDK: streamed chat (some with stop sequences or a
temperature, a fifth closed after three chunks), tool calls (``auto``, ``required``, a named
function), ``json_object`` answers, two-turn conversations, prompts of ~3,000 tokens and
prompts over the 4,096-token window, completions with logprobs, the Responses API (streamed
and not), embeddings and invalid requests, against ``small``, ``full`` and ``auto``.

Each kind of request has its expected outcome (an answer of the right shape, a 400
``context_length_exceeded``, a 400 for a bad role ...); a 503 after the backend's queue
timeout is counted apart (the load is meant to overload the 1.5B now and then). At the end
the tenant's ledger must hold nothing reserved and have spent what the access log charged.
Writes ``benchmarks/results/soak-<time>.md`` (a table per kind: expected, other, p50 and
max seconds) and prints it; the gateway's log goes under
``benchmarks/results/runs/soak-<time>/``. The soak found the 431 that long prompts got on
kept-alive connections and the 1e-9 J left reserved (see the git log).

    .venv/bin/python benchmarks/soak.py                      # 240 s, 6 workers
    .venv/bin/python benchmarks/soak.py --duration 600 --concurrency 10
    .venv/bin/python benchmarks/soak.py --cascade            # the tenant cascades (below)

With ``--cascade`` the tenant's ``auto`` requests cascade as the README suggests for mixed
traffic: the prompt signal with the heuristic prior, ``threshold: 1`` and a capacity of half
on ``full`` (the least sure half escalates); the report counts the requests probed,
escalated and held from the access log.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import os
import random
import signal
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import openai
import yaml

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
KEY, ADMIN = "sk-soak-tenant", "sk-soak-admin"
TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                   "required": ["city"]}}}]
PROMPTS = ["Write a Python function that reverses a linked list.", "What is 17 * 23?",
           "Explain the difference between a process and a thread in two sentences.",
           "Write a bash one-liner that counts lines in all .py files.", "Say hi.",
           "Implement binary search in Python with type hints and a docstring.",
           "List three sorting algorithms and their time complexity."]
#: ~2,900 tokens of code with the chat template: fits the 4,096-token window; twice it does not.
LONG = "\n".join(f"def f{k}(x):\n    return x * {k} + {k * k}  # helper number {k}"
                 for k in range(100))


def say(msg: str) -> None:
    print(f"soak: {msg}", file=sys.stderr, flush=True)


@dataclass
class Tally:
    expected: int = 0
    other: list[str] = field(default_factory=list)
    overloaded: int = 0
    seconds: list[float] = field(default_factory=list)


class Soak:
    def __init__(self, url: str, seed: int):
        self.client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key=KEY, max_retries=0,
                                         timeout=900)
        self.rng = random.Random(seed)
        self.tallies: dict[str, Tally] = {}

    def model(self, *choices: str) -> str:
        return self.rng.choice(choices or ("small", "full", "auto"))

    async def chat_stream(self) -> bool:
        kw: dict[str, Any] = {
            "model": self.model(), "max_tokens": self.rng.choice([8, 32, 96]), "stream": True,
            "stream_options": {"include_usage": True},
            "messages": [{"role": "system", "content": "Be brief."},
                         {"role": "user", "content": self.rng.choice(PROMPTS)}]}
        if self.rng.random() < 0.3:
            kw["stop"] = ["\n\n"]
        if self.rng.random() < 0.3:
            kw["temperature"] = 0.7
        cancel = self.rng.random() < 0.2
        usage, n = None, 0
        stream = await self.client.chat.completions.create(**kw)
        async for chunk in stream:
            usage = chunk.usage or usage
            n += 1
            if cancel and n == 3:
                await stream.close()  # the client leaves: the gateway logs a 499
                return True
        extra = (usage.model_extra or {}) if usage else {}
        return (usage is not None and usage.completion_tokens <= kw["max_tokens"]
                and extra.get("energy_joules") is not None)

    async def chat_tools(self) -> bool:
        choice = self.rng.choice(["auto", "required", {"type": "function",
                                                       "function": {"name": "get_weather"}}])
        kw: dict[str, Any] = {
            "model": self.model(), "tools": TOOLS, "tool_choice": choice, "max_tokens": 64,
            "messages": [{"role": "user", "content": "What's the weather in Paris?"}]}
        r = await self.client.chat.completions.create(**kw)
        message = r.choices[0].message
        if message.tool_calls:
            call = message.tool_calls[0]
            return (call.type == "function" and call.function.name == "get_weather"
                    and isinstance(json.loads(call.function.arguments), dict))
        return choice == "auto" and message.content is not None

    async def chat_json(self) -> bool:
        r = await self.client.chat.completions.create(
            model=self.model("small", "full"), response_format={"type": "json_object"},
            messages=[{"role": "user", "content": "A JSON object with a person's name and age."}],
            max_tokens=64)
        try:
            return isinstance(json.loads(r.choices[0].message.content or ""), dict)
        except json.JSONDecodeError:
            return r.choices[0].finish_reason == "length"  # cut by max_tokens: may be partial

    async def two_turns(self) -> bool:
        model = self.model("small", "full")
        messages: list[Any] = [{"role": "system", "content": "You are a concise assistant."},
                               {"role": "user", "content": self.rng.choice(PROMPTS)}]
        first = await self.client.chat.completions.create(model=model, messages=messages,
                                                          max_tokens=48, temperature=0)
        messages += [{"role": "assistant", "content": first.choices[0].message.content},
                     {"role": "user", "content": "Now make it shorter."}]
        second = await self.client.chat.completions.create(model=model, messages=messages,
                                                           max_tokens=32, temperature=0)
        assert first.usage and second.usage
        return (second.usage.prompt_tokens > first.usage.prompt_tokens
                and second.choices[0].message.content is not None)

    async def long_prompt(self) -> bool:
        r = await self.client.chat.completions.create(
            model=self.model("small", "full"), max_tokens=16,
            messages=[{"role": "user", "content": LONG + "\nWhich function returns the most "
                                                         "for x=1?"}])
        return r.usage is not None and r.usage.prompt_tokens > 2000

    async def over_window(self) -> bool:
        try:
            await self.client.chat.completions.create(
                model=self.model("small", "full"), max_tokens=16,
                messages=[{"role": "user", "content": LONG * 2}])
        except openai.BadRequestError as exc:
            return exc.code == "context_length_exceeded" and exc.param == "messages"
        return False

    async def completion(self) -> bool:
        r = await self.client.completions.create(model=self.model(), prompt="def add(a, b):",
                                                 max_tokens=24, logprobs=self.rng.choice([None, 2]))
        return r.usage is not None and r.usage.completion_tokens <= 24

    async def responses(self) -> bool:
        if self.rng.random() < 0.5:
            r = await self.client.responses.create(model=self.model("small", "auto"),
                                                   input="Name a prime number.",
                                                   max_output_tokens=16)
            return r.status in ("completed", "incomplete")
        kinds = []
        async for event in await self.client.responses.create(
                model="small", input="Count to five.", max_output_tokens=24, stream=True):
            kinds.append(event.type)
        return bool(kinds) and kinds[-1] in ("response.completed", "response.incomplete")

    async def embeddings(self) -> bool:
        r = await self.client.embeddings.create(model="auto", input=["hello world", "joules"])
        return len(r.data) == 2 and len(r.data[0].embedding) > 0

    async def bad_role(self) -> bool:
        try:
            kw: dict[str, Any] = {"model": "small", "max_tokens": 5,
                                  "messages": [{"role": "wizard", "content": "x"}]}
            await self.client.chat.completions.create(**kw)
        except openai.BadRequestError as exc:
            error = (exc.body or {}) if isinstance(exc.body, dict) else {}
            return set(error) >= {"message", "type", "param", "code"}
        return False

    def kinds(self) -> list[Callable[[], Awaitable[bool]]]:
        weights = {self.chat_stream: 5, self.chat_tools: 2, self.chat_json: 1,
                   self.two_turns: 2, self.long_prompt: 1, self.over_window: 1,
                   self.completion: 2, self.responses: 2, self.embeddings: 1,
                   self.bad_role: 1}
        return [kind for kind, weight in weights.items() for _ in range(weight)]

    async def worker(self, end: float) -> None:
        pool = self.kinds()
        while time.monotonic() < end:
            kind = self.rng.choice(pool)
            tally = self.tallies.setdefault(kind.__name__, Tally())
            t0 = time.monotonic()
            try:
                ok = await kind()
                detail = "unexpected answer"
            except openai.APIStatusError as exc:
                if exc.status_code == 503:  # a backend's queue timed out: overload, not a fault
                    tally.overloaded += 1
                    continue
                ok, detail = False, f"{exc.status_code} {exc.body}"
            except Exception as exc:  # noqa: BLE001 - every failure is reported
                ok, detail = False, repr(exc)
            tally.seconds.append(time.monotonic() - t0)
            if ok:
                tally.expected += 1
            else:
                tally.other.append(detail[:300])


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


CASCADE = {"estimator": "cascade",
           "cascade": {"signal": "prompt", "prior": "heuristic", "threshold": 1.0, "to": "full"},
           "capacity": {"full": {"fraction": 0.5, "window_s": 600}}}


def policy(state: Path, port: int, cascade: bool = False) -> dict[str, Any]:
    default = yaml.safe_load((ROOT / "policies" / "default.yaml").read_text())
    default["server"]["port"] = port
    default["state_dir"] = str(state)
    default["admin"]["keys"] = ["sha256:" + hashlib.sha256(ADMIN.encode()).hexdigest()]
    tenant = default["tenants"]["demo"]
    tenant["keys"] = ["sha256:" + hashlib.sha256(KEY.encode()).hexdigest()]
    tenant["budgets"] = [{"window": "1d", "joules": 10_000_000}]
    if cascade:
        tenant["routing"] = CASCADE
    return dict(default)


def access_records(log: Path) -> list[dict[str, Any]]:
    """The tenant's access records in the gateway's log."""
    records = []
    for line in log.read_text(errors="replace").splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if record.get("request_id") and record.get("tenant") == "demo":
            records.append(record)
    return records


def ledger_check(url: str, log: Path) -> tuple[float, float, float]:
    """(spent, reserved) of the tenant's budget, and the joules its access records charged."""
    window = httpx.get(f"{url}/admin/tenants/demo/budget", timeout=30,
                       headers={"authorization": f"Bearer {ADMIN}"}).json()["windows"][0]
    charged = sum(r.get("energy_joules") or 0.0 for r in access_records(log))
    return window["spent_joules"], window["reserved_joules"], charged


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=float, default=240.0, help="seconds of traffic")
    parser.add_argument("--concurrency", type=int, default=6)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--cascade", action="store_true",
                        help="the tenant's auto requests cascade (see the module's doc)")
    args = parser.parse_args()
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    run = RESULTS / "runs" / f"soak-{stamp}"
    run.mkdir(parents=True, exist_ok=True)
    port = free_port()
    (run / "policy.yaml").write_text(yaml.safe_dump(policy(run / "state", port, args.cascade),
                                                sort_keys=False))
    log = run / "gateway.log"
    say(f"starting the gateway on the default tiers (port {port}); log in {log}")
    with open(log, "ab") as out:
        server = subprocess.Popen([sys.executable, "-m", "gateway.cli", "serve", "--policy",
                                   str(run / "policy.yaml")], stdout=out,
                                  stderr=subprocess.STDOUT, start_new_session=True,
                                  env={**os.environ, "PYTHONUNBUFFERED": "1"})
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 600
        while True:
            if server.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"the gateway did not get ready; see {log}")
            try:
                if httpx.get(f"{url}/readyz", timeout=5).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(1)
        say(f"{args.concurrency} workers for {args.duration:.0f} s")
        soak = Soak(url, args.seed)

        async def traffic() -> None:
            end = time.monotonic() + args.duration
            await asyncio.gather(*(soak.worker(end) for _ in range(args.concurrency)))

        asyncio.run(traffic())
        time.sleep(2)  # the last access records and settles
        spent, reserved, charged = ledger_check(url, log)
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(60)
    lines = [f"# Soak on the default local tiers ({stamp})", "",
             f"- Command: `.venv/bin/python benchmarks/soak.py {' '.join(sys.argv[1:])}`",
             f"- {args.concurrency} workers (openai SDK) for {args.duration:.0f} s; the 0.5B "
             "and 1.5B in-process, wordllama; 2 cores",
             "", "| kind | as expected | other | 503 (queue timeout) | p50 s | max s |",
             "|---|---:|---:|---:|---:|---:|"]
    failures = []
    for name, tally in sorted(soak.tallies.items()):
        p50 = statistics.median(tally.seconds) if tally.seconds else 0.0
        top = max(tally.seconds, default=0.0)
        lines.append(f"| {name} | {tally.expected} | {len(tally.other)} | {tally.overloaded} | "
                     f"{p50:.2f} | {top:.2f} |")
        failures += [f"- {name}: {detail}" for detail in tally.other[:5]]
    balanced = abs(spent - charged) < 1e-3 and reserved == 0
    lines += ["", f"- Ledger: spent {spent:.6f} J, access log charged {charged:.6f} J, reserved "
                  f"{reserved} J: {'balanced' if balanced else 'NOT balanced'}"]
    if args.cascade:
        probed = [r for r in access_records(log) if r.get("cascade_confidence") is not None]
        lines.append(f"- Cascade ({json.dumps(CASCADE)}): {len(probed)} requests probed, "
                     f"{sum(bool(r.get('cascade_from')) for r in probed)} escalated, "
                     f"{sum(bool(r.get('cascade_held')) for r in probed)} held by the capacity")
    if failures:
        lines += ["", "## Answers not as expected (first five per kind)", "", *failures]
    text = "\n".join(lines) + "\n"
    path = RESULTS / f"soak-{stamp}.md"
    path.write_text(text)
    print(text)
    say(f"wrote {path.relative_to(ROOT)}")
    return 0 if balanced and not failures else 1


if __name__ == "__main__":
    sys.exit(main())
