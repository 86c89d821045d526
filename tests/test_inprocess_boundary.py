"""The unit tier's boundary holds: a test marked `unit` cannot start a process, connect an
internet socket or assemble a model (tests/conftest.py locks those doors)."""

from __future__ import annotations

import socket
import subprocess
import sys

import pytest

from .conftest import NotAUnitTest

pytestmark = pytest.mark.unit


def test_a_unit_test_cannot_start_a_process():
    with pytest.raises(NotAUnitTest, match="start a subprocess"):
        subprocess.run([sys.executable, "-c", "pass"], check=True)


def test_a_unit_test_cannot_connect_an_internet_socket():
    with socket.socket() as s, pytest.raises(NotAUnitTest, match="network"):
        s.connect(("127.0.0.1", 9))
    with socket.socket(socket.AF_INET6) as s, pytest.raises(NotAUnitTest, match="network"):
        s.connect_ex(("::1", 9))


def test_a_unit_test_may_use_a_local_unix_socket(tmp_path):
    path = str(tmp_path / "s")
    with socket.socket(socket.AF_UNIX) as server, socket.socket(socket.AF_UNIX) as client:
        server.bind(path)
        server.listen(1)
        client.connect(path)  # local IPC, not network


def test_a_unit_test_cannot_assemble_a_model():
    import backends.models

    with pytest.raises(NotAUnitTest, match="assemble a GGUF model"):
        backends.models.resolve_model_path("qwen2.5-coder-0.5b-instruct-q4_k_m")
