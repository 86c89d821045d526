"""The `joulegate` command's surface: version, help written for users, assembly progress."""

from __future__ import annotations

import io
from importlib import metadata

import pytest

from gateway.cli import COMMANDS, build_parser, main
from gateway.cli.models import AssemblyProgress

# Marked test by test: the unit ones start no process and open no socket.


@pytest.mark.unit
def test_version(capsys):
    with pytest.raises(SystemExit) as done:
        main(["--version"])
    assert done.value.code == 0
    assert capsys.readouterr().out.strip() == f"joulegate {metadata.version('joulegate')}"


@pytest.mark.unit
def test_every_command_has_user_help(capsys):
    parser = build_parser()
    with pytest.raises(SystemExit):
        parser.parse_args(["--help"])
    top = capsys.readouterr().out
    commands = list(parser._subparsers._group_actions[0].choices)  # type: ignore[union-attr]
    assert len(COMMANDS) >= 5
    for name in commands:
        assert name in top
        with pytest.raises(SystemExit):
            parser.parse_args([name, "--help"])
        text = capsys.readouterr().out
        # Written for users: no module docstrings, no Python signatures, no ``rst`` markup.
        assert "``" not in text and ":func:" not in text and "Namespace" not in text, name


def fake_clock(times):
    it = iter(times)
    return lambda: next(it)


@pytest.mark.unit
def test_assembly_progress_on_a_terminal_draws_a_bar_with_rate_and_eta():
    out = io.StringIO()
    # start at 0 s; 100 MB after 1 s; done (200 MB) after 2 s; finish at 2 s
    progress = AssemblyProgress("m", 200_000_000, out, live=True, clock=fake_clock([0, 1, 2, 2]))
    progress(100_000_000)
    assert out.getvalue().startswith("\rm: [" + "#" * 15 + "." * 15 + "]")
    assert "100.0/200.0 MB" in out.getvalue() and "100.0 MB/s" in out.getvalue()
    assert "ETA    1 s" in out.getvalue()
    progress(200_000_000)
    progress.finish()
    assert out.getvalue().endswith("\nm: assembled 200.0 MB in 2.0 s (100 MB/s), sha256 checked\n")


@pytest.mark.unit
def test_assembly_progress_off_a_terminal_is_one_line_per_model():
    out = io.StringIO()
    progress = AssemblyProgress("m", 10_000_000, out, live=False, clock=fake_clock([0, 5]))
    for done in range(0, 10_000_001, 1_000_000):
        progress(done)
    progress.finish()
    assert out.getvalue() == "m: assembled 10.0 MB in 5.0 s (2 MB/s), sha256 checked\n"


@pytest.mark.e2e
def test_a_closed_pipe_ends_the_command_quietly():
    import os
    import subprocess
    import sys

    read, write = os.pipe()
    os.close(read)  # like `| head` that has already gone: every write fails with EPIPE
    try:
        done = subprocess.run([sys.executable, "-m", "gateway.cli", "keys", "hash", "x"],
                              stdout=write, stderr=subprocess.PIPE, text=True, timeout=60,
                              check=False)
    finally:
        os.close(write)
    assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr
