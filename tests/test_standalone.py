"""The checkout stands alone: nothing reads the folder ``shared`` beside it.

Users and CI have only the repository, so no tracked file may name that path or build it
(``"shared" / "bench"``, ``parent / "shared"``). Markdown may still cite where things came
from.
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

pytestmark = pytest.mark.e2e  # runs git

REPO = Path(__file__).resolve().parents[1]
THIS_FILE = Path(__file__).resolve()  # its examples below spell the path out on purpose
SKIP_DIRS = {".git", ".venv", ".venv-vllm", "__pycache__", ".pytest_cache", ".tools", "build",
             "node_modules"}

# The path written out (two dots, a slash, "shared"), or built from parts: parent / "shared",
# "shared" / "bench", Path("..", "shared"), os.path.join(.., "shared").
OUTSIDE = re.compile(
    r"""\.\.[/\\]shared\b"""
    r"""|(?:parent|parents\[\d+\]|\.\.['"])\s*[/,]\s*['"]shared['"]"""
    r"""|['"]shared['"]\s*/\s*['"]\w"""
    r"""|['"]\.\.['"]\s*,\s*['"]shared['"]""")


def tracked_files() -> list[Path]:
    """The repository's files as git sees them (tracked, plus new ones not ignored); without
    git (an unpacked source archive), every file in the tree outside build folders."""
    try:
        out = subprocess.run(["git", "ls-files", "-z", "--cached", "--others",
                              "--exclude-standard"], cwd=REPO, capture_output=True,
                             check=True).stdout
        return [REPO / name for name in out.decode().split("\0") if name]
    except (OSError, subprocess.CalledProcessError):
        return [path for path in REPO.rglob("*") if path.is_file()
                and not SKIP_DIRS.intersection(path.relative_to(REPO).parts[:-1])]


def outside_references(files: list[Path], root: Path = REPO) -> list[str]:
    """``path:line: text`` for every line outside Markdown that names or builds the path."""
    found = []
    for path in files:
        if path.suffix == ".md" or path == THIS_FILE or not path.is_file():
            continue
        try:
            text = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):  # binary: no path to read in it
            continue
        for number, line in enumerate(text.splitlines(), 1):
            if OUTSIDE.search(line):
                found.append(f"{path.relative_to(root)}:{number}: {line.strip()}")
    return found


def test_no_tracked_file_reads_the_folder_beside_the_checkout():
    files = tracked_files()
    assert REPO / "pyproject.toml" in files and REPO / "gateway" / "routing" / "train.py" in files
    found = outside_references(files)
    assert not found, "files that reach outside the checkout:\n" + "\n".join(found)


@pytest.mark.parametrize("line", [
    'HARNESS = "..' + '/shared/bench/run_compare.sh"',  # joined: this file stays clean
    'SHARED = Path(__file__).resolve().parent.parent.parent / "shared" / "bench"',
    'data = ROOT.parent / "shared" / "routing-data"',
    "return Path(__file__).resolve().parents[2].parent / 'shared'",
    'os.path.join(here, "..", "shared", "bench")',
    r'cd ..\shared\bench',
])
def test_the_check_catches_each_way_of_writing_the_path(tmp_path, line):
    source = tmp_path / "reader.py"
    source.write_text(f"x = 1\n{line}\n")
    (tmp_path / "notes.md").write_text(f"{line}\n")  # Markdown may cite it
    found = outside_references([source, tmp_path / "notes.md"], tmp_path)
    assert len(found) == 1 and found[0].startswith("reader.py:2:")


@pytest.mark.parametrize("line", [
    "A device that also serves other clients (a shared vLLM server)",
    'ledger = {"kind": "redis", "url": "redis://redis.shared:6379/3"}',
    "def test_duplicate_tier_and_shared_key_and_reserved_name():",
    'data = Path(__file__).resolve().parents[2] / "data" / "routing"',
])
def test_the_check_leaves_other_uses_of_the_word_alone(tmp_path, line):
    source = tmp_path / "ok.py"
    source.write_text(line + "\n")
    assert outside_references([source], tmp_path) == []
