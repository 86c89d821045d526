"""vLLM's OpenAI server, one or several replicas, load-aware.

Builds on :class:`backends.openai_http.OpenAIBackend` (one per replica) and adds:

- **Load**: every ``metrics_interval_s`` each replica's ``/metrics`` is scraped
  (``vllm:num_requests_running``, ``vllm:num_requests_waiting``, ``vllm:prompt_tokens_total``,
  ``vllm:generation_tokens_total``, ``vllm:kv_cache_usage_perc`` when present) into a
  :class:`Load`: queue depth and token rates, for routing (skip a saturated tier) and for
  energy attribution (the server's own token counts on that device).
- **Balancing**: least outstanding requests among the replicas in service.
- **Ejection**: a replica that fails ``eject_after`` times in a row is taken out for
  ``eject_s`` seconds (doubling while it keeps failing its health check, up to ten times).
  Only the replica's own faults count (:data:`_NOT_THE_REPLICAS`): a request it refuses as
  invalid, or a model answer that broke the request's contract, would fail on any replica,
  and one client sending bad requests must not take healthy servers out of service.
- **Retries**: a request that fails before its first byte (unreachable, overloaded, no
  first token in time) is retried on another replica, up to ``retries`` times; after the
  first byte, failures reach the caller.
- **Managed mode**: with ``managed`` settings the backend launches a local vLLM server and
  supervises it (:mod:`backends.vllm_managed`).
- **Prompt scores** (``GenerationRequest.prompt_logprobs``, the cascade's prompt signal):
  vLLM scores a prompt (its ``prompt_logprobs`` field) only when not streaming, so the
  prompt is first sent for one token with ``prompt_logprobs: 0`` (each position's own
  token only), and the answer follows on the same replica, whose prefix cache holds the
  prompt by then. A stream's first chunk carries the scores before any answer is asked
  for: a cascade that escalates closes the stream there and pays for the prompt read and
  one token. The prompt is charged once: the answer's own usage replaces the scoring
  request's when it comes.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections.abc import AsyncGenerator, Iterator, Mapping
from dataclasses import replace
from typing import Annotated, Any

import aiohttp
import orjson
from pydantic import Field, model_validator

from .base import (
    Backend,
    BackendError,
    BackendInvalidOutput,
    BackendRejected,
    BackendTimeout,
    BackendUnavailable,
    Chunk,
    ContextWindowExceeded,
    Generation,
    GenerationRequest,
    Health,
    Load,
    Usage,
)
from .features import TokenLogprob
from .kind import BackendKind, Capabilities, Requirement, Settings
from .openai_http import (
    URL_PATTERN,
    Malformed,
    OpenAIBackend,
    OpenAISettings,
    Timeouts,
    parse_usage,
)
from .vllm_managed import ManagedServer, ManagedSettings

log = logging.getLogger("joulegate.backends.vllm")

_RETRYABLE = (BackendUnavailable, BackendTimeout)
#: Failures that say nothing of the replica's health (see the module docstring): the
#: request's (a 4xx: invalid parameters, a prompt over the context window) or the model's
#: (a tool call or JSON answer that does not parse), the same on every replica.
_NOT_THE_REPLICAS = (BackendRejected, BackendInvalidOutput)
#: Work of a prompt token relative to a generated one, for the gateway's share of a server.
PREFILL_WEIGHT = 0.1


class VLLMSettings(Settings):
    """vLLM's OpenAI server: one URL, several replicas, or a managed local server."""

    #: One server, e.g. ``http://vllm-moe:8000/v1`` ...
    base_url: str | None = Field(None, pattern=URL_PATTERN)
    #: ... or several replicas of the same model (least-outstanding balancing).
    replicas: list[Annotated[str, Field(pattern=URL_PATTERN)]] | None = None
    managed: ManagedSettings | None = None
    api_key: str | None = None
    timeouts: Timeouts = Timeouts()
    max_connections: int = Field(256, ge=1, le=100_000)
    #: Seconds between scrapes of each replica's /metrics.
    metrics_interval_s: float = Field(2.0, gt=0, le=300)
    #: Routing skips this backend's tiers while every replica has at least this many
    #: waiting requests (vllm:num_requests_waiting); unset: never.
    max_waiting: int | None = Field(None, ge=0)
    #: Retries on another replica before the first byte (unreachable, overloaded, too slow).
    retries: int = Field(1, ge=0, le=10)
    #: A replica failing this many times in a row is ejected for eject_s (doubling).
    eject_after: int = Field(3, ge=1, le=1000)
    eject_s: float = Field(30.0, gt=0, le=3600)

    @model_validator(mode="after")
    def _one_source(self) -> VLLMSettings:
        given = [k for k in ("base_url", "replicas", "managed") if getattr(self, k)]
        if len(given) != 1:
            raise ValueError("give exactly one of base_url, replicas or managed"
                             + (f" (got {', '.join(given)})" if given else ""))
        return self


def parse_vllm_metrics(text: str) -> dict[str, float]:
    """Sum each ``vllm:*`` sample we use over its label sets (engines, models)."""
    from prometheus_client.parser import text_string_to_metric_families

    wanted = {"vllm:num_requests_running", "vllm:num_requests_waiting",
              "vllm:prompt_tokens_total", "vllm:generation_tokens_total",
              "vllm:kv_cache_usage_perc", "vllm:gpu_cache_usage_perc"}
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name in wanted:
                out[sample.name] = out.get(sample.name, 0.0) + float(sample.value)
    return out


def parse_prompt_logprobs(raw: bytes, chat: bool, last: int
                          ) -> tuple[list[TokenLogprob], Usage | None]:
    """vLLM's scores of a prompt, from a non-streamed answer to ``prompt_logprobs: 0``: one
    entry per prompt position, ``null`` for the first (nothing before it) and else
    ``{token_id: {"logprob", "rank", "decoded_token"}}``, the position's own token first
    (with ``0``, alone); at the top of a chat completion, in ``choices[0]`` of a completion.
    The last ``last`` positions' tokens, and the answer's usage."""
    try:
        doc = orjson.loads(raw)
    except orjson.JSONDecodeError:
        raise Malformed("the body is not JSON") from None
    if not isinstance(doc, dict):
        raise Malformed("the body is not an object")
    holder = doc
    if not chat:
        choices = doc.get("choices")
        if not isinstance(choices, list) or not choices or not isinstance(choices[0], dict):
            raise Malformed("no choices")
        holder = choices[0]
    positions = holder.get("prompt_logprobs")
    if not isinstance(positions, list):
        raise Malformed("no prompt_logprobs (is this a vLLM server?)")
    scored: list[TokenLogprob] = []
    for position in positions[-last:] if last > 0 else []:
        if position is None:
            continue  # the prompt's first token: nothing before it to score it by
        if not isinstance(position, dict) or not position:
            raise Malformed("a prompt position's scores are not an object")
        own = next(iter(position.values()))
        if not isinstance(own, dict):
            raise Malformed("a prompt token's score is not an object")
        logprob, token = own.get("logprob"), own.get("decoded_token")
        if isinstance(logprob, bool) or not isinstance(logprob, int | float) or not (
                math.isfinite(logprob) and logprob <= 0):
            raise Malformed("a prompt token's logprob is not a log-probability")
        if not isinstance(token, str):
            raise Malformed("a prompt token has no decoded_token")
        scored.append(TokenLogprob(token, float(logprob)))
    return scored, parse_usage(doc.get("usage"))


class Replica:
    def __init__(self, backend: OpenAIBackend, metrics_url: str):
        self.backend = backend
        self.url = backend.base_url
        self.metrics_url = metrics_url
        self.outstanding = 0
        self.served = 0
        self.failures = 0  # consecutive
        self.ejected_until = 0.0
        self.ejections = 0
        #: Ejected: back in service only after its cool-down and a good health check.
        self.ejected = False
        self.load = Load()
        #: Tokens of the gateway's own requests on this replica (prompt, generated).
        self.own_tokens = [0, 0]
        self._own_at_scrape = (0, 0)
        #: The gateway's share of the server's token work over the last scrape interval.
        self.own_fraction = 1.0

    def in_service(self, now: float) -> bool:
        return not self.ejected

    def count(self, request: GenerationRequest) -> None:
        self.own_tokens[0] += request.progress.prompt_tokens
        self.own_tokens[1] += request.progress.completion_tokens

    def succeeded(self) -> None:
        self.served += 1
        self.failures = 0
        self.ejections = 0

    def failed(self, eject_after: int, eject_s: float) -> bool:
        """Count a failure; True when this one ejects the replica."""
        self.failures += 1
        if self.failures >= eject_after and not self.ejected:
            self.eject(eject_s)
            return True
        return False

    def eject(self, eject_s: float) -> None:
        """Out for a cool-down that doubles with each ejection in a row (up to 2**10)."""
        self.ejected = True
        self.ejections += 1
        self.ejected_until = time.monotonic() + eject_s * 2 ** min(self.ejections - 1, 10)
        self.failures = 0

    async def probe(self, eject_s: float) -> None:
        """After the cool-down: back in service if healthy, else ejected again (longer)."""
        if time.monotonic() < self.ejected_until:
            return
        if (await self.backend.health()).ok:
            self.ejected = False
            log.info("replica %s back in service", self.url)
        else:
            self.eject(eject_s)

    def info(self) -> dict[str, object]:
        now = time.monotonic()
        return {"url": self.url, "outstanding": self.outstanding, "served": self.served,
                "in_service": self.in_service(now),
                "running": self.load.running, "waiting": self.load.waiting,
                "kv_cache_usage": self.load.kv_cache_usage,
                "generation_tokens_per_s": round(self.load.generation_tokens_per_s, 3)}


class VLLMBackend(Backend):
    kind = "vllm"

    def __init__(self, name: str, settings: VLLMSettings):
        super().__init__(name)
        self.metrics_interval_s = settings.metrics_interval_s
        self.max_waiting = settings.max_waiting
        self.retries = settings.retries
        self.eject_after = settings.eject_after
        self.eject_s = settings.eject_s
        self.managed = None
        base_url = settings.base_url
        if settings.managed is not None:
            self.managed = ManagedServer(name, settings.managed)
            base_url = self.managed.base_url
        urls = list(settings.replicas or []) or ([base_url] if base_url else [])
        self.replicas = [
            Replica(OpenAIBackend(f"{name}[{i}]" if len(urls) > 1 else name, OpenAISettings(
                base_url=url, api_key=settings.api_key, timeouts=settings.timeouts,
                max_connections=settings.max_connections)), _metrics_url(url))
            for i, url in enumerate(urls)]
        self._rotation = 0
        self._session: aiohttp.ClientSession | None = None
        self._task: asyncio.Task[None] | None = None

    # -- lifecycle ----------------------------------------------------------------------

    async def start(self) -> None:
        if self.managed is not None:
            await self.managed.start()
        for r in self.replicas:
            await r.backend.start()
        self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5))
        await self.scrape()
        self._task = asyncio.get_running_loop().create_task(self._watch())

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        for r in self.replicas:
            await r.backend.close()
        if self._session is not None:
            await self._session.close()
        if self.managed is not None:
            await self.managed.stop()

    # -- load ---------------------------------------------------------------------------

    async def scrape(self) -> None:
        """Read every replica's /metrics once (failures leave the last reading)."""
        await asyncio.gather(*(self._scrape(r) for r in self.replicas))

    async def _scrape(self, replica: Replica) -> None:
        if self._session is None:
            return
        try:
            async with self._session.get(replica.metrics_url) as resp:
                if resp.status != 200:
                    return
                values = parse_vllm_metrics(await resp.text())
        except (aiohttp.ClientError, TimeoutError, ValueError):
            return
        now = time.monotonic()
        old = replica.load
        load = Load(
            running=values.get("vllm:num_requests_running", 0.0),
            waiting=values.get("vllm:num_requests_waiting", 0.0),
            kv_cache_usage=values.get("vllm:kv_cache_usage_perc",
                                      values.get("vllm:gpu_cache_usage_perc")),
            prompt_tokens_total=values.get("vllm:prompt_tokens_total", 0.0),
            generation_tokens_total=values.get("vllm:generation_tokens_total", 0.0),
            scraped_at=now)
        own = (replica.own_tokens[0], replica.own_tokens[1])
        if old.scraped_at:
            server_work = (max(load.prompt_tokens_total - old.prompt_tokens_total, 0) * PREFILL_WEIGHT
                           + max(load.generation_tokens_total - old.generation_tokens_total, 0))
            own_work = ((own[0] - replica._own_at_scrape[0]) * PREFILL_WEIGHT
                        + own[1] - replica._own_at_scrape[1])
            replica.own_fraction = min(own_work / server_work, 1.0) if server_work > 0 else 1.0
        replica._own_at_scrape = own
        if old.scraped_at and now > old.scraped_at:
            dt = now - old.scraped_at
            # A restarted server's counters start again from 0: no rate for that interval.
            load.prompt_tokens_per_s = max(load.prompt_tokens_total - old.prompt_tokens_total, 0) / dt
            load.generation_tokens_per_s = max(
                load.generation_tokens_total - old.generation_tokens_total, 0) / dt
        replica.load = load

    def load(self) -> Load:
        """The replicas in service, summed."""
        now = time.monotonic()
        total = Load()
        for r in self.replicas:
            if not r.in_service(now):
                continue
            total.running += r.load.running
            total.waiting += r.load.waiting
            total.prompt_tokens_total += r.load.prompt_tokens_total
            total.generation_tokens_total += r.load.generation_tokens_total
            total.prompt_tokens_per_s += r.load.prompt_tokens_per_s
            total.generation_tokens_per_s += r.load.generation_tokens_per_s
            total.scraped_at = max(total.scraped_at, r.load.scraped_at)
        return total

    def own_fraction(self) -> float:
        """The gateway's share of its servers' token work over the last scrape interval (1.0
        when it is their only client); energy attribution charges only this share of a
        device's energy to the gateway's requests."""
        fractions = [(r.own_fraction, r.load.generation_tokens_per_s + 1e-9) for r in self.replicas]
        return sum(f * w for f, w in fractions) / sum(w for _, w in fractions)

    def saturated(self) -> bool:
        """True when every replica in service has at least ``max_waiting`` queued requests
        (or none is in service)."""
        if self.max_waiting is None:
            return False
        now = time.monotonic()
        live = [r for r in self.replicas if r.in_service(now)]
        return not live or all(r.load.waiting >= self.max_waiting for r in live)

    async def _watch(self) -> None:
        """Scrape metrics; probe ejected replicas whose cool-down ended."""
        while True:
            await asyncio.sleep(self.metrics_interval_s)
            await self.scrape()
            await asyncio.gather(*(r.probe(self.eject_s) for r in self.replicas if r.ejected))

    # -- requests -----------------------------------------------------------------------

    def _pick(self, tried: set[int]) -> tuple[int, Replica] | None:
        now = time.monotonic()
        live = [(i, r) for i, r in enumerate(self.replicas) if i not in tried and r.in_service(now)]
        if not live:
            return None
        # Fewest outstanding, then shortest server queue; ties rotate, so an idle pool
        # spreads sequential requests instead of always using the first replica.
        n, start = len(self.replicas), self._rotation
        self._rotation = (self._rotation + 1) % n
        return min(live, key=lambda ir: (ir[1].outstanding, ir[1].load.waiting, (ir[0] - start) % n))

    def _unavailable(self) -> BackendUnavailable:
        return BackendUnavailable(f"backend '{self.name}': no replica in service", retry_after_s=5)

    def _note_failure(self, replica: Replica, exc: BaseException) -> None:
        if isinstance(exc, _NOT_THE_REPLICAS):
            return
        if replica.failed(self.eject_after, self.eject_s):
            log.warning("backend '%s': replica %s ejected for %.0f s after repeated failures (%s)",
                        self.name, replica.url, replica.ejected_until - time.monotonic(), exc)

    def _attempts(self) -> Iterator[Replica]:
        """The replicas to try one request on: the best first, then others (retries)."""
        tried: set[int] = set()
        for _ in range(self.retries + 1):
            picked = self._pick(tried)
            if picked is None:
                return
            tried.add(picked[0])
            yield picked[1]

    async def _score_prompt(self, replica: Replica, request: GenerationRequest
                            ) -> list[TokenLogprob] | None:
        """The prompt's last ``request.prompt_logprobs`` tokens scored by ``replica``, in a
        non-streamed request for one token, whose usage counts as the replica's work and is
        the request's progress until the answer's own replaces it. ``None`` when the server
        will not score it (a build that refuses ``prompt_logprobs``, or an answer without
        them): the request is then answered unscored, as the cascade takes any backend's
        answer without scores (warned in the log; never the client's error, nor the
        replica's). A prompt over the context window is the client's, as for any answer."""
        scoring = replace(request, max_tokens=1, logprobs=False, top_logprobs=None,
                          extra={**request.extra, "prompt_logprobs": 0}, progress=Usage())
        try:
            raw = await replica.backend.complete_raw(scoring)
            scored, usage = parse_prompt_logprobs(raw, request.is_chat, request.prompt_logprobs)
        except ContextWindowExceeded:
            raise
        except (BackendRejected, Malformed) as exc:
            log.warning("backend '%s': replica %s did not score the prompt (%s); answering "
                        "unscored", self.name, replica.url, exc)
            return None
        if usage is not None:
            request.progress.prompt_tokens = usage.prompt_tokens
            request.progress.completion_tokens = usage.completion_tokens
            replica.count(request)  # the scoring request's own work, counted where it ran
        return scored

    async def complete(self, request: GenerationRequest) -> Generation:
        last: BackendError | None = None
        scored: list[TokenLogprob] | None = None
        asked = request.prompt_logprobs > 0  # scores still to ask for (once, on any replica)
        for replica in self._attempts():
            replica.outstanding += 1
            answered = False
            try:
                if asked:
                    scored, asked = await self._score_prompt(replica, request), False
                result = await replica.backend.complete(request)
                answered = True
                result.prompt_logprobs = scored
            except _RETRYABLE as exc:
                self._note_failure(replica, exc)
                last = exc
                continue
            except BackendError as exc:
                self._note_failure(replica, exc)
                raise
            finally:
                replica.outstanding -= 1
                if answered:
                    replica.count(request)
            replica.succeeded()
            return result
        raise last or self._unavailable()

    async def stream(self, request: GenerationRequest) -> AsyncGenerator[Chunk, None]:
        """The replicas' stream, the best first. With ``prompt_logprobs`` the prompt's scores
        come first, as a chunk of their own (:meth:`_score_prompt`); the answer is asked for
        once that chunk has been taken. An answer that fails before its first chunk is asked
        of the next replica (the scores are not asked again)."""
        last: BackendError | None = None
        asked = request.prompt_logprobs > 0  # scores still to ask for (once, on any replica)
        for replica in self._attempts():
            replica.outstanding += 1
            chunks: AsyncGenerator[Chunk, None] | None = None
            answered = False
            try:
                try:
                    if asked:  # a replica that fails to score it leaves it to the next
                        scores = await self._score_prompt(replica, request)
                        asked = False
                        if scores is not None:
                            replica.succeeded()
                            yield Chunk(prompt_logprobs=scores)
                    chunks = replica.backend.stream(request)
                    first = await anext(chunks)
                except _RETRYABLE as exc:  # nothing of the answer yet: another replica
                    self._note_failure(replica, exc)
                    last = exc
                    continue
                except StopAsyncIteration:
                    return
                answered = True
                replica.succeeded()
                yield first
                async for chunk in chunks:
                    yield chunk
                return
            except BackendError as exc:
                self._note_failure(replica, exc)
                raise
            finally:
                replica.outstanding -= 1
                if chunks is not None:
                    await chunks.aclose()
                if answered:
                    replica.count(request)
        raise last or self._unavailable()

    async def health(self) -> Health:
        if self.managed is not None and not self.managed.ready:
            return Health(False, f"managed vLLM server: {self.managed.state}",
                          {"managed": self.managed.info()})
        results = await asyncio.gather(*(r.backend.health() for r in self.replicas))
        now = time.monotonic()
        ok = [h.ok and r.in_service(now) for r, h in zip(self.replicas, results, strict=True)]
        load = self.load()
        info: dict[str, object] = {
            "replicas": [r.info() for r in self.replicas], "waiting": load.waiting,
            "running": load.running, "saturated": self.saturated()}
        if self.managed is not None:
            info["managed"] = self.managed.info()
        if any(ok):
            return Health(True, f"{sum(ok)}/{len(ok)} replicas in service", info)
        return Health(False, "no replica in service", info)


def _metrics_url(base_url: str) -> str:
    """vLLM serves /metrics at the root, beside the /v1 API."""
    root = base_url.rstrip("/")
    if root.endswith("/v1"):
        root = root[:-3]
    return root + "/metrics"


def _runs_vllm_here(settings: Mapping[str, Any]) -> bool:
    """A managed server run by the gateway's own Python needs vLLM installed beside it."""
    managed = settings.get("managed")
    return isinstance(managed, Mapping) and bool(managed) and not managed.get("python")


KIND = BackendKind(
    VLLMBackend.kind, VLLMSettings,
    # tools, structured output, logprobs: passed through to vLLM (its server flags decide);
    # insertion too (vLLM serves `suffix` for models whose renderer writes FIM prompts).
    Capabilities(streaming=True, tools=True, structured_output=True, logprobs=True,
                 prompt_logprobs=True, insertion=True), VLLMBackend,
    requirement=Requirement("vllm", "vllm", "vllm", mode="managed",
                            hint="or set managed.python to a Python that has vLLM"),
    needs_requirement=_runs_vllm_here)
