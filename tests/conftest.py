"""Shared helpers: free ports, real gateway processes, the real Qwen 0.5B GGUF."""

from __future__ import annotations

import os
import select
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import yaml

from policies import key_digest

# -- what `unit` means, enforced -----------------------------------------------------------
#
# A test marked `unit` starts no process, opens no network connection and assembles no
# model. For those tests (their fixtures included) the environment's doors are locked:
# starting a subprocess, connecting an internet socket (AF_UNIX stays open: it is local
# IPC, not network) and assembling a catalog model raise at once, naming the test's
# marker as the thing to fix.


class NotAUnitTest(RuntimeError):
    """A test marked `unit` crossed the boundary of the unit tier."""


def _refuse(what: str):
    def refuse(*args, **kwargs):
        raise NotAUnitTest(f"a test marked 'unit' tried to {what}: mark it e2e, or drive "
                           "the code in-process (tests/inprocess.py)")
    return refuse


def _lock_unit_boundary(mp: pytest.MonkeyPatch) -> None:
    import backends.models
    import gateway.cli.models

    mp.setattr(subprocess.Popen, "__init__", _refuse("start a subprocess"))
    connect, connect_ex = socket.socket.connect, socket.socket.connect_ex

    def guarded(real, what):
        def call(self, address, *args):
            if self.family == getattr(socket, "AF_UNIX", None):
                return real(self, address, *args)
            _refuse(f"{what} to {address!r} (network)")()
        return call

    mp.setattr(socket.socket, "connect", guarded(connect, "connect"))
    mp.setattr(socket.socket, "connect_ex", guarded(connect_ex, "connect"))
    assemble = _refuse("assemble a GGUF model")
    mp.setattr(backends.models, "assemble", assemble)
    mp.setattr(backends.models, "_chunk_files", assemble)  # also catches a direct reference
    mp.setattr(gateway.cli.models, "assemble", assemble)


def _unit_phase(item):
    if item.get_closest_marker("unit") is None:
        return (yield)
    with pytest.MonkeyPatch.context() as mp:
        _lock_unit_boundary(mp)
        return (yield)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_setup(item):
    return (yield from _unit_phase(item))


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item):
    return (yield from _unit_phase(item))


@pytest.hookimpl(wrapper=True)
def pytest_runtest_teardown(item):
    return (yield from _unit_phase(item))


def pytest_collection_modifyitems(config, items):
    """Every test says which tier it belongs to: exactly one of `unit` and `e2e`."""
    wrong = [f"{item.nodeid}: marked {' and '.join(tiers) or 'neither unit nor e2e'}"
             for item in items
             if len(tiers := [t for t in ("unit", "e2e") if item.get_closest_marker(t)]) != 1]
    if wrong:
        raise pytest.UsageError("every test is marked either unit or e2e:\n  " + "\n  ".join(wrong))


@pytest.fixture
def anyio_backend():
    """`@pytest.mark.anyio` tests (the in-process tier) run on asyncio."""
    return "asyncio"


SMALL_MODEL = "qwen2.5-coder-0.5b-instruct-q4_k_m"
SMALL_MODEL_ID = "qwen2.5-coder-0.5b-instruct"
KEYS = {"acme": "sk-test-acme", "globex": "sk-test-globex", "initech": "sk-test-initech"}
ADMIN_KEY = "sk-test-admin"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until(predicate, timeout: float, interval: float = 0.05, what: str = "condition"):
    """Poll ``predicate`` until it returns a truthy value; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(interval)


def answers_ok(proc: subprocess.Popen, url: str, what: str, log=lambda: "") -> bool:
    """Whether the server process ``proc`` answers ``url`` with 200; fails, showing
    ``log()``, if it has exited."""
    if proc.poll() is not None:
        raise AssertionError(f"{what} exited with {proc.returncode}:\n{log()}")
    try:
        return httpx.get(url, timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def stop_process_group(proc: subprocess.Popen | None, timeout: float) -> None:
    """SIGTERM the process group ``proc`` leads, SIGKILL it after ``timeout`` seconds."""
    if proc and proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def tenant(name: str, **extra) -> dict:
    return {"keys": ["sha256:" + key_digest(KEYS[name])], **extra}


def llamacpp_policy(**server) -> dict:
    """One tier on the real Qwen 0.5B: one slot, short queue timeout, small body limit."""
    return {
        "version": 1,
        "server": {"max_body_bytes": 4096, **server},
        "admin": {"keys": ["sha256:" + key_digest(ADMIN_KEY)]},
        "backends": {"q05": {"kind": "llamacpp", "model": SMALL_MODEL, "n_ctx": 2048, "slots": 1,
                             "max_queue": 8, "queue_timeout_s": 60, "n_threads": 2}},
        "tiers": [{"name": "small", "backend": "q05", "model": SMALL_MODEL_ID, "cost": 1.0}],
        "tenants": {"acme": tenant("acme", default_tier="small"),
                    "globex": tenant("globex", default_tier="small")},
    }


class Gateway:
    """A real ``joulegate serve`` process on a loopback port."""

    def __init__(self, policy: dict, workdir: Path, env: dict[str, str] | None = None,
                 workers: int = 1):
        self.policy_path = workdir / "policy.yaml"
        self.log_path = workdir / "gateway.log"
        self.write_policy(policy)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self._env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
        self.proc: subprocess.Popen | None = None
        self.workers = workers

    def write_policy(self, policy: dict) -> None:
        self.policy_path.write_text(yaml.safe_dump(policy, sort_keys=False))

    def start(self, timeout: float = 180) -> Gateway:
        with open(self.log_path, "ab") as log:  # the child keeps its own descriptor
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "gateway.cli", "serve", "--policy", str(self.policy_path),
                 "--port", str(self.port), "--workers", str(self.workers)],
                stdout=log, stderr=subprocess.STDOUT, env=self._env, start_new_session=True)

        wait_until(lambda: answers_ok(self.proc, f"{self.url}/healthz", "gateway", self.log),
                   timeout, interval=0.2, what="gateway start")
        return self

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def signal(self, sig: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    def stop(self) -> None:
        stop_process_group(self.proc, 20)

    def client(self, who: str = "acme"):
        import openai

        return openai.OpenAI(base_url=f"{self.url}/v1", api_key=KEYS[who], max_retries=0,
                             timeout=120)

    def backend_info(self, name: str) -> dict:
        return httpx.get(f"{self.url}/readyz", timeout=10).json()["backends"][name]


@pytest.fixture(scope="session")
def small_model_path() -> Path:
    from backends.models import resolve_model_path

    return resolve_model_path(SMALL_MODEL)


@pytest.fixture(scope="module")
def gateway(tmp_path_factory, small_model_path) -> Iterator[Gateway]:
    gw = Gateway(llamacpp_policy(), tmp_path_factory.mktemp("gw")).start()
    yield gw
    gw.stop()


FAKE_UPSTREAM = Path(__file__).resolve().parent / "fake_upstream.py"


class FakeUpstream:
    """The fast fake OpenAI upstream, ``tests/fake_upstream.py``, as a process (fixed usage:
    12 + 12 tokens)."""

    def __init__(self, delay_ms: int = 0, options: tuple[str, ...] = ()):
        # Kept open: read if the upstream fails to start, closed when it stops.
        self.stderr = tempfile.TemporaryFile()  # noqa: SIM115
        self.proc = subprocess.Popen([sys.executable, str(FAKE_UPSTREAM), "--port", "0",
                                      "--delay-ms", str(delay_ms), *options],
                                     stdout=subprocess.PIPE, stderr=self.stderr)
        ready = self._ready_line(30)
        if not ready.startswith("READY "):
            self.stop(close=False)
            self.stderr.seek(0)
            log = self.stderr.read().decode(errors="replace")
            self.stderr.close()
            raise AssertionError(f"fake upstream did not start (printed {ready!r}):\n{log}")
        self.port = int(ready.split()[1])
        self.url = f"http://127.0.0.1:{self.port}/v1"

    def _ready_line(self, timeout: float) -> str:
        """The first line the process prints, or ``""`` if none comes within ``timeout``."""
        if not select.select([self.proc.stdout], [], [], timeout)[0]:
            return ""
        return self.proc.stdout.readline().decode(errors="replace").strip()

    def stop(self, close: bool = True) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.proc.stdout.close()
        if close:
            self.stderr.close()


@pytest.fixture(scope="module")
def upstream():
    """The fast fake upstream, shared by a test module."""
    up = FakeUpstream()
    yield up
    up.stop()


@pytest.fixture
def gateways(tmp_path):
    """``make(policy)`` starts a gateway on that policy (state in its own folder); all of
    them are stopped after the test."""
    made: list[Gateway] = []

    def make(policy: dict) -> Gateway:
        work = tmp_path / f"gw{len(made)}"
        work.mkdir()
        policy["state_dir"] = str(work / "state")
        gw = Gateway(policy, work)
        made.append(gw)
        return gw.start()

    yield make
    for gw in made:
        gw.stop()


class RedisServer:
    """A real redis-server on a free loopback port (no persistence)."""

    def __init__(self, port: int | None = None):
        self.port = port or free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.start()

    def start(self) -> None:
        self.proc = subprocess.Popen(["redis-server", "--port", str(self.port), "--bind",
                                      "127.0.0.1", "--save", "", "--appendonly", "no"],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_until(lambda: subprocess.run(["redis-cli", "-p", str(self.port), "ping"],
                                          capture_output=True, text=True,
                                          check=False).stdout.strip() == "PONG",
                   20, 0.05, "redis-server")

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=10)


def priced_policy(upstream_url: str, tenant_extra: dict, ledger: dict | None = None) -> dict:
    """Tiers `big` (2 J/token) and `small` (1 J/token) on one fake upstream, priced per token,
    with calibration seeds equal to the prices."""

    def tier(name, backend, price, cost):
        return {"name": name, "backend": backend, "model": f"{name}-model", "cost": cost,
                "joules_per_prompt_token": price, "joules_per_output_token": price}

    def backend(price):
        return {"kind": "openai", "base_url": upstream_url,
                "energy": {"meter": "estimated", "joules_per_prompt_token": price,
                           "joules_per_output_token": price}}

    policy = {
        "version": 1,
        "admin": {"keys": ["sha256:" + key_digest(ADMIN_KEY)]},
        "backends": {"up-big": backend(2.0), "up-small": backend(1.0)},
        "tiers": [tier("big", "up-big", 2.0, 2.0), tier("small", "up-small", 1.0, 1.0)],
        "tenants": {"acme": tenant("acme", **{"default_tier": "big", **tenant_extra}),
                    "globex": tenant("globex", default_tier="big")},
    }
    if ledger:
        policy["ledger"] = ledger
    return policy


# -- vLLM -------------------------------------------------------------------------------

REPO = Path(__file__).resolve().parent.parent
VLLM_VENV = Path(os.environ.get("JOULEGATE_VLLM_VENV", REPO / ".venv-vllm"))
VLLM_PYTHON = VLLM_VENV / "bin" / "python"
TINY_MOE_NAME = "tiny-qwen3-moe"


def vllm_env(cache: Path) -> dict[str, str]:
    """vLLM on CPU: a small KV cache, caches in the test's folder, never a hub download."""
    return {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_CACHE_ROOT": str(cache / "vllm"),
            "TORCHINDUCTOR_CACHE_DIR": str(cache / "inductor"), "HF_HUB_OFFLINE": "1",
            "TRANSFORMERS_OFFLINE": "1", "VLLM_NO_USAGE_STATS": "1", "DO_NOT_TRACK": "1"}


@pytest.fixture(scope="session")
def tiny_moe(tmp_path_factory) -> Path:
    """The tiny Qwen3-MoE checkpoint, built here with transformers (tests/tiny_moe.py)."""
    if not VLLM_PYTHON.exists():
        pytest.fail(f"{VLLM_PYTHON} missing: scripts/vllm-venv creates it (scripts/test runs it)")
    out = tmp_path_factory.mktemp("tiny-moe") / TINY_MOE_NAME
    subprocess.run([str(VLLM_PYTHON), str(REPO / "tests" / "tiny_moe.py"), str(out)], check=True,
                   capture_output=True, timeout=300)
    return out


class VLLMServer:
    """A real vLLM OpenAI server (vllm-cpu) on a loopback port, serving ``model``."""

    def __init__(self, model: Path, workdir: Path, args: list[str] | None = None,
                 port: int | None = None, max_model_len: int = 2048):
        self.model, self.workdir, self.args = model, workdir, list(args or [])
        self.max_model_len = max_model_len
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}/v1"
        self.log_path = workdir / f"vllm-{self.port}.log"
        self.proc: subprocess.Popen | None = None

    def command(self) -> list[str]:
        return [str(VLLM_PYTHON), "-m", "vllm.entrypoints.openai.api_server", "--model",
                str(self.model), "--served-model-name", TINY_MOE_NAME, "--host", "127.0.0.1",
                "--port", str(self.port), "--max-model-len", str(self.max_model_len), "--dtype", "bfloat16",
                *self.args]

    def start(self, timeout: float = 400) -> VLLMServer:
        with open(self.log_path, "ab") as log:  # the child keeps its own descriptor
            self.proc = subprocess.Popen(self.command(), stdout=log, stderr=subprocess.STDOUT,
                                         env=vllm_env(self.workdir), start_new_session=True)

        wait_until(lambda: answers_ok(
            self.proc, f"http://127.0.0.1:{self.port}/health", "vLLM",
            lambda: self.log_path.read_text(errors="replace")[-4000:]), timeout, 0.5, "vLLM start")
        return self

    def kill(self) -> None:
        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=30)

    def stop(self) -> None:
        stop_process_group(self.proc, 30)


def access_records(log_text: str) -> list[dict]:
    """The access log's records (logger ``joulegate.access``) in a gateway's JSON log."""
    import json

    records = []
    for line in log_text.splitlines():
        if line.startswith("{"):
            record = json.loads(line)
            if record.get("logger") == "joulegate.access":
                records.append(record)
    return records


@pytest.fixture
def prometheus_for(tmp_path):
    """Starts Debian's Prometheus (tests/test_dashboard.py's ``Prometheus``) scraping one
    target; stops every one started when the test ends."""
    from .test_dashboard import Prometheus

    started: list[Prometheus] = []

    def start(target: str) -> Prometheus:
        work = tmp_path / f"prom{len(started)}"
        work.mkdir()
        started.append(Prometheus(target, work))
        return started[-1]

    yield start
    for prom in started:
        prom.stop()
