"""The quick start: `joulegate serve` with no policy serves both real models of the default."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import pytest

from .conftest import free_port, wait_until

pytestmark = pytest.mark.e2e


def test_serve_with_the_embedded_default_policy(tmp_path, small_model_path):
    import openai

    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("JOULEGATE_")}
    env.update(XDG_STATE_HOME=str(tmp_path / "state"), PYTHONUNBUFFERED="1")
    log = tmp_path / "serve.log"
    with open(log, "wb") as out:  # the child keeps its own descriptor
        proc = subprocess.Popen([sys.executable, "-m", "gateway.cli", "serve", "--port", str(port)],
                                stdout=out, stderr=subprocess.STDOUT, env=env,
                                start_new_session=True)
    try:
        wait_until(lambda: "Uvicorn running" in log.read_text() or proc.poll() is not None, 240,
                   0.2, "default gateway start")
        assert proc.poll() is None, log.read_text()
        keys = json.loads((tmp_path / "state" / "joulegate" / "default-keys.json").read_text())
        printed = log.read_text()
        assert keys["JOULEGATE_DEMO_KEY"] in printed  # the demo key is printed at start-up
        assert oct((tmp_path / "state" / "joulegate" / "default-keys.json").stat().st_mode)[-3:] == "600"
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1",
                               api_key=keys["JOULEGATE_DEMO_KEY"], max_retries=0, timeout=120)
        assert [m.id for m in client.models.list()] == [
            "auto", "embed", "wordllama-l2-supercat", "small", "qwen2.5-coder-0.5b-instruct",
            "full", "qwen2.5-coder-1.5b-instruct"]
        msgs = [{"role": "user", "content": "Say hi."}]
        auto = client.chat.completions.with_raw_response.create(model="auto", messages=msgs,
                                                                 max_tokens=2)
        assert auto.headers["x-joulegate-tier"] == "small"
        full = client.chat.completions.create(model="full", messages=msgs, max_tokens=2)
        assert full.model == "qwen2.5-coder-1.5b-instruct" and full.usage.completion_tokens == 2
        vectors = client.embeddings.create(model="auto", input=["one", "two"])
        assert vectors.model == "wordllama-l2-supercat" and len(vectors.data) == 2
        assert len(vectors.data[0].embedding) == 256
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)
