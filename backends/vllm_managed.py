"""Managed mode: the gateway launches a local vLLM OpenAI server and supervises it.

:class:`ManagedServer` starts ``python -m vllm.entrypoints.openai.api_server`` with the
policy's model, arguments, port and environment, waits until ``GET /health`` answers 200,
restarts it with backoff (1, 2, 4 ... 60 s) whenever it exits, and stops it on shutdown
(SIGTERM to its process group, SIGKILL after ``stop_timeout_s``). Its output goes to a log
file beside the gateway's state. Single node only; on Kubernetes, point the tier at the
vLLM Service instead (``base_url``/``replicas``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import sys
import tempfile
import time
from pathlib import Path

import aiohttp
from pydantic import Field

from .kind import Settings

log = logging.getLogger("joulegate.backends.vllm")


class ManagedSettings(Settings):
    """Launch and supervise a local vLLM server for this backend (single node)."""

    #: Model path or name for ``--model`` (a local directory: nothing is downloaded).
    model: str = Field(min_length=1)
    served_model_name: str | None = None
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=1, le=65535)
    #: Extra vLLM arguments, e.g. ``["--max-model-len", "4096", "--dtype", "bfloat16"]``.
    args: list[str] = Field(default_factory=list)
    env: dict[str, str] = Field(default_factory=dict)
    #: Python of the environment vLLM is installed in (default: the gateway's).
    python: str | None = None
    start_timeout_s: float = Field(600.0, gt=0, le=7200)
    stop_timeout_s: float = Field(20.0, gt=0, le=600)
    log_file: str | None = None


class ManagedServer:
    def __init__(self, name: str, settings: ManagedSettings):
        self.name = name
        self.model = settings.model
        self.port = port = settings.port
        self.host = host = settings.host
        self.args = list(settings.args)
        self.env = dict(settings.env)
        self.python = settings.python or sys.executable
        self.served_model_name = settings.served_model_name
        self.start_timeout_s = settings.start_timeout_s
        self.stop_timeout_s = settings.stop_timeout_s
        self.log_file = Path(settings.log_file) if settings.log_file else \
            Path(tempfile.gettempdir()) / f"joulegate-vllm-{name}-{port}.log"
        self.base_url = f"http://{host}:{port}/v1"
        self.state = "stopped"
        self.restarts = 0
        self._proc: asyncio.subprocess.Process | None = None
        self._supervisor: asyncio.Task[None] | None = None
        self._stopping = False

    @property
    def ready(self) -> bool:
        return self.state == "ready"

    def command(self) -> list[str]:
        cmd = [self.python, "-m", "vllm.entrypoints.openai.api_server", "--model", self.model,
               "--host", self.host, "--port", str(self.port)]
        if self.served_model_name:
            cmd += ["--served-model-name", self.served_model_name]
        return cmd + self.args

    def info(self) -> dict[str, object]:
        return {"state": self.state, "pid": self._proc.pid if self._proc else None,
                "restarts": self.restarts, "log": str(self.log_file)}

    async def start(self) -> None:
        """Launch and wait until ready (raises if it does not come up in time)."""
        await self._launch()
        try:
            await self._wait_ready(self.start_timeout_s)
        except BaseException:
            await self.stop()
            raise
        self._supervisor = asyncio.get_running_loop().create_task(self._supervise())

    async def _launch(self) -> None:
        self.state = "starting"
        env = {**os.environ, **self.env}
        self.log_file.parent.mkdir(parents=True, exist_ok=True)
        # A local log file, opened once per launch of a server that takes a minute to start.
        with open(self.log_file, "ab") as out:  # noqa: ASYNC230
            self._proc = await asyncio.create_subprocess_exec(
                *self.command(), stdout=out, stderr=asyncio.subprocess.STDOUT, env=env,
                start_new_session=True)
        log.info("backend '%s': started vLLM (pid %d) on port %d; log %s", self.name,
                 self._proc.pid, self.port, self.log_file)

    async def _wait_ready(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        url = f"http://{self.host}:{self.port}/health"
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=2)) as session:
            while time.monotonic() < deadline:
                if self._proc is None or self._proc.returncode is not None:
                    raise RuntimeError(f"vLLM exited with {self._proc.returncode if self._proc else '?'}"
                                       f" while starting; see {self.log_file}")
                with contextlib.suppress(aiohttp.ClientError, TimeoutError):
                    async with session.get(url) as resp:
                        if resp.status == 200:
                            self.state = "ready"
                            return
                await asyncio.sleep(0.5)
        raise TimeoutError(f"vLLM was not ready within {timeout_s:g} s; see {self.log_file}")

    async def _supervise(self) -> None:
        backoff = 1.0
        while not self._stopping:
            assert self._proc is not None
            code = await self._proc.wait()
            if self._stopping:
                return
            self.state = "restarting"
            self.restarts += 1
            log.error("backend '%s': vLLM exited with %s; restarting in %.0f s", self.name, code,
                      backoff)
            await asyncio.sleep(backoff)
            try:
                await self._launch()
                await self._wait_ready(self.start_timeout_s)
                backoff = 1.0
            except (RuntimeError, TimeoutError, OSError) as exc:
                log.error("backend '%s': restart failed: %s", self.name, exc)
                backoff = min(backoff * 2, 60.0)
                await self._kill()

    async def _kill(self) -> None:
        proc = self._proc
        if proc is None or proc.returncode is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            await asyncio.wait_for(proc.wait(), self.stop_timeout_s)
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            await proc.wait()

    async def stop(self) -> None:
        self._stopping = True
        if self._supervisor is not None:
            self._supervisor.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._supervisor
        await self._kill()
        self.state = "stopped"
