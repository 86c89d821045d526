"""The gateway in-process: the real FastAPI app, its lifespan run here, driven through
``httpx.ASGITransport`` (and the official ``openai.AsyncOpenAI`` on the same transport),
with :class:`tests.scripted.ScriptedBackend` at the backend boundary.

No model files, no subprocess, no socket: the policy's ``openai`` backends name a
``base_url`` that is never contacted, because the app builds scripted backends instead
(``create_app(build_backend=...)``). Energy is metered ``estimated`` from token prices, so
the joules of every request are exact: ``prompt x price + completion x price``.

    async with InProcessGateway(tmp_path, scripts={"up-big": [Script(tokens=["hi"])]}) as gw:
        r = await gw.post("/v1/chat/completions", {...})
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterable
from pathlib import Path

import httpx
import yaml

from .conftest import ADMIN_KEY, KEYS, priced_policy
from .scripted import ScriptedBackend, ScriptSource

#: Never contacted: the backends behind it are scripted.
UNUSED_UPSTREAM = "http://upstream.invalid/v1"
BASE_URL = "http://gateway.test"
#: Joules per token (prompt and output alike) of the two tiers of :func:`policy`.
PRICE = {"big": 2.0, "small": 1.0}


def policy(tenant_extra: dict | None = None, **top) -> dict:
    """Tiers ``big`` (backend ``up-big``, 2 J/token) and ``small`` (``up-small``, 1 J/token),
    tenants ``acme`` (default tier ``big``, plus ``tenant_extra``) and ``globex``."""
    p = priced_policy(UNUSED_UPSTREAM, tenant_extra or {})
    p.update(top)
    return p


def in_process_small(p: dict, disable: list[str] | None = None) -> dict:
    """``p`` with tier ``small`` on an in-process kind (llama.cpp, scripted here), optionally
    with some of its capabilities turned off by the policy (``disable``)."""
    p["backends"]["up-small"] = {"kind": "llamacpp", "model": "unused.gguf",
                                 "energy": {"meter": "estimated"}}
    if disable:
        next(t for t in p["tiers"] if t["name"] == "small")["disable"] = disable
    return p


def chat_body(content: str = "Say hello in one short sentence.", model: str = "big", **extra) -> dict:
    return {"model": model, "messages": [{"role": "user", "content": content}], **extra}


def auth(who: str = "acme") -> dict[str, str]:
    return {"authorization": f"Bearer {KEYS[who]}"}


ADMIN = {"authorization": f"Bearer {ADMIN_KEY}"}


class InProcessGateway:
    """The app for ``policy`` (default :func:`policy`) with scripted backends; state in
    ``workdir``. ``scripts`` maps a backend name to what its requests get (see
    :class:`ScriptedBackend`); backends without an entry answer the default script."""

    def __init__(self, workdir: Path, policy_dict: dict | None = None,
                 scripts: dict[str, ScriptSource] | None = None):
        self.workdir = Path(workdir)
        self.policy_path = self.workdir / "policy.yaml"
        self.policy = policy_dict if policy_dict is not None else policy()
        self.policy.setdefault("state_dir", str(self.workdir / "state"))
        self.scripts = dict(scripts or {})
        #: backend name → the scripted backend serving it now; all ever built, in order.
        self.backends: dict[str, ScriptedBackend] = {}
        self.built: list[ScriptedBackend] = []
        self.write_policy(self.policy)
        from gateway.app import create_app

        self.app = create_app(self.policy_path, build_backend=self._build)
        self._lifespan = None
        self.http: httpx.AsyncClient | None = None

    def _build(self, name: str, spec) -> ScriptedBackend:
        # An openai entry is an HTTP tier, a llamacpp entry an in-process one: the kind's
        # real capabilities and metering apply, the scripted backend answers either way.
        assert spec.kind in ("openai", "llamacpp"), f"backend '{name}' would not be scripted"
        backend = ScriptedBackend(name, self.scripts.get(name))
        self.backends[name] = backend
        self.built.append(backend)
        return backend

    def write_policy(self, policy_dict: dict) -> None:
        self.policy_path.write_text(yaml.safe_dump(policy_dict, sort_keys=False))

    @property
    def runtime(self):
        return self.app.state.runtime

    async def __aenter__(self):
        self._lifespan = self.app.router.lifespan_context(self.app)
        await self._lifespan.__aenter__()
        self.http = httpx.AsyncClient(transport=httpx.ASGITransport(app=self.app),
                                      base_url=BASE_URL, timeout=30)
        return self

    async def __aexit__(self, *exc) -> None:
        try:
            if self.http is not None:
                await self.http.aclose()
        finally:
            await self._lifespan.__aexit__(*exc)

    # -- clients ------------------------------------------------------------------------

    def openai(self, who: str = "acme", **kw):
        """The official SDK, talking to this app over the same in-process transport."""
        import openai

        return openai.AsyncOpenAI(
            base_url=f"{BASE_URL}/v1", api_key=KEYS[who], max_retries=kw.pop("max_retries", 0),
            http_client=httpx.AsyncClient(transport=httpx.ASGITransport(app=self.app),
                                          base_url=BASE_URL, timeout=30), **kw)

    async def post(self, path: str, body: dict | bytes, who: str | None = "acme",
                   headers: dict[str, str] | None = None) -> httpx.Response:
        h = {**(auth(who) if who else {}), **(headers or {})}
        if isinstance(body, bytes):
            return await self.http.post(path, content=body,
                                        headers={"content-type": "application/json", **h})
        return await self.http.post(path, json=body, headers=h)

    async def chat(self, who: str = "acme", headers: dict | None = None, **body) -> httpx.Response:
        return await self.post("/v1/chat/completions", chat_body(**body), who, headers)

    # -- what the gateway says about itself ---------------------------------------------

    async def metric(self, name: str, **labels: str) -> float:
        """The sum of samples ``name`` whose labels include ``labels`` (0 if none)."""
        from prometheus_client.parser import text_string_to_metric_families

        text = (await self.http.get("/metrics")).text
        total = 0.0
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                if sample.name == name and all(sample.labels.get(k) == v
                                               for k, v in labels.items()):
                    total += sample.value
        return total

    async def budget(self, tenant: str = "acme") -> dict[str, dict]:
        """The tenant's windows from the admin API, by window name."""
        r = await self.http.get(f"/admin/tenants/{tenant}/budget", headers=ADMIN)
        assert r.status_code == 200, r.text
        return {w["window"]: w for w in r.json()["windows"]}

    async def reload(self, policy_dict: dict) -> httpx.Response:
        self.write_policy(policy_dict)
        return await self.http.post("/admin/reload", headers=ADMIN)


async def until(predicate, what: str = "condition", polls: int = 2000) -> None:
    """Yield to the app until ``predicate()`` holds (gateway state with no event to await)."""
    for _ in range(polls):
        if predicate():
            return
        await asyncio.sleep(0.005)  # the state polled has no event to await
    raise AssertionError(f"never happened: {what}")


def sse_events(text: str) -> list:
    """The ``data:`` payloads of an SSE body, JSON-decoded; ``[DONE]`` stays a string."""
    events = []
    for block in text.split("\n\n"):
        if not block.strip():
            continue
        assert block.startswith("data: "), f"not an SSE data event: {block!r}"
        data = block[len("data: "):]
        events.append(data if data == "[DONE]" else json.loads(data))
    return events


def joules(prompt_tokens: int, completion_tokens: int, tier: str) -> float:
    return (prompt_tokens + completion_tokens) * PRICE[tier]


async def stream_then_disconnect(app, path: str, body: dict, headers: dict[str, str],
                                 events_before_disconnect: int, limit_s: float = 10
                                 ) -> tuple[int, list[bytes]]:
    """Drive ``app`` over ASGI as a client that reads ``events_before_disconnect`` body
    messages of a streamed response and then goes away (``http.disconnect``); returns the
    status and the body messages received. (httpx's ASGITransport buffers whole
    responses, so it cannot leave mid-stream.)"""
    raw = json.dumps(body).encode()
    scope = {
        "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST",
        "scheme": "http", "path": path, "raw_path": path.encode(), "query_string": b"",
        "root_path": "", "server": ("gateway.test", 80), "client": ("127.0.0.1", 40000),
        "headers": [(b"host", b"gateway.test"), (b"content-type", b"application/json"),
                    (b"content-length", str(len(raw)).encode()),
                    *((k.lower().encode(), v.encode()) for k, v in headers.items())],
    }
    sent_request = False
    gone = asyncio.Event()
    status: list[int] = []
    bodies: list[bytes] = []

    async def receive() -> dict:
        nonlocal sent_request
        if not sent_request:
            sent_request = True
            return {"type": "http.request", "body": raw, "more_body": False}
        await gone.wait()
        return {"type": "http.disconnect"}

    async def send(message: dict) -> None:
        if gone.is_set():
            return  # as uvicorn does: what is sent to a client that left goes nowhere
        if message["type"] == "http.response.start":
            status.append(message["status"])
        elif message["type"] == "http.response.body" and message.get("body"):
            bodies.append(message["body"])
            if len(bodies) >= events_before_disconnect:
                gone.set()

    await asyncio.wait_for(app(scope, receive, send), limit_s)
    return status[0], bodies


def tiers_of(responses: Iterable[httpx.Response]) -> list[str]:
    return [r.headers["x-joulegate-tier"] for r in responses]
