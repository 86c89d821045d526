#!/usr/bin/env python3
"""Which llama.cpp build suits this CPU: the ggml instruction-set options that are safe.

The decision is pure (:func:`flags`: a CPU's ``/proc/cpuinfo`` flag set in, a build name
and the CMake arguments out), so that the bootstrap, ``scripts/build-llama-tools`` and the
table test in ``tests/test_cpu_build.py`` all share it, and ``joulegate models --info`` reads
the loaded library's features with it. Only the standard library is used: the bootstrap runs
this file as a script (by its path) before the project is installed.

Rules:

* Never ``GGML_NATIVE``: ``-march=native`` compiles in whatever the CPU advertises, and these
  VMs advertise AMX without granting it (the kernel refuses the tile state), so a native
  build dies in ``llama_decode`` (``ldtilecfg``). AMX (``GGML_AMX_TILE/INT8/BF16``) is
  therefore always OFF, whatever the flags say.
* Every x86 option is set explicitly, ON or OFF: with ``GGML_NATIVE=OFF`` ggml's own
  defaults turn AVX/AVX2/FMA/F16C/BMI2 on, which would be wrong on a CPU without them.
* AVX-512 needs the five subsets ggml compiles for it (F, CD, VL, DQ, BW); its VBMI, VNNI
  and BF16 extensions are added when the CPU has them as well. The AVX2 build (AVX, AVX2,
  FMA, F16C) is the fallback; below that only SSE4.2, then nothing.

Command line (used by the scripts)::

    backends/llamacpp_build.py shell [--cpuinfo FILE]   # build_name=..; build_key=..; cmake_args=..
    backends/llamacpp_build.py show  [--cpuinfo FILE]   # the choice, for people
    backends/llamacpp_build.py prove --record FILE --version V [--model GGUF] [--wheel W]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shlex
import sys
import time
from pathlib import Path

#: The ggml options this module decides, in the order they are passed.
X86_OPTIONS = (
    "GGML_SSE42", "GGML_AVX", "GGML_AVX2", "GGML_FMA", "GGML_F16C", "GGML_BMI2",
    "GGML_AVX_VNNI", "GGML_AVX512", "GGML_AVX512_VBMI", "GGML_AVX512_VNNI", "GGML_AVX512_BF16",
    "GGML_AMX_TILE", "GGML_AMX_INT8", "GGML_AMX_BF16",
)
#: Never turned on, whatever the CPU advertises (see the module docstring).
REFUSED = frozenset({"GGML_AMX_TILE", "GGML_AMX_INT8", "GGML_AMX_BF16"})

#: The /proc/cpuinfo flags each option needs, all of them.
_NEEDS: dict[str, frozenset[str]] = {
    "GGML_SSE42": frozenset({"sse4_2"}),
    "GGML_AVX": frozenset({"avx"}),
    "GGML_AVX2": frozenset({"avx", "avx2", "fma", "f16c"}),
    "GGML_FMA": frozenset({"fma"}),
    "GGML_F16C": frozenset({"f16c"}),
    "GGML_BMI2": frozenset({"bmi2"}),
    "GGML_AVX_VNNI": frozenset({"avx_vnni"}),
    "GGML_AVX512": frozenset({"avx512f", "avx512cd", "avx512vl", "avx512dq", "avx512bw"}),
    "GGML_AVX512_VBMI": frozenset({"avx512vbmi"}),
    "GGML_AVX512_VNNI": frozenset({"avx512_vnni"}),
    "GGML_AVX512_BF16": frozenset({"avx512_bf16"}),
}
#: The feature llama_print_system_info() reports for an option compiled in.
SYSTEM_INFO_NAME = {
    "GGML_AVX": "AVX", "GGML_AVX2": "AVX2", "GGML_FMA": "FMA", "GGML_F16C": "F16C",
    "GGML_BMI2": "BMI2", "GGML_AVX_VNNI": "AVX_VNNI", "GGML_AVX512": "AVX512",
    "GGML_AVX512_VBMI": "AVX512_VBMI", "GGML_AVX512_VNNI": "AVX512_VNNI",
    "GGML_AVX512_BF16": "AVX512_BF16", "GGML_AMX_INT8": "AMX_INT8",
}


def cpuinfo_flags(text: str) -> set[str]:
    """The flags every processor in a ``/proc/cpuinfo`` text has (their intersection, so a
    mixed machine gets what all its cores can run); empty when there is no ``flags`` line
    (not x86)."""
    sets = [set(value.split()) for key, _, value in
            (line.partition(":") for line in text.splitlines()) if key.strip() == "flags"]
    return set.intersection(*sets) if sets else set()


def enabled(cpu: set[str]) -> list[str]:
    """The options to turn on for a CPU with these flags (AMX never)."""
    on = {opt for opt, needs in _NEEDS.items() if needs <= cpu}
    if "GGML_AVX2" not in on:
        # ggml's AVX/FMA/F16C/BMI2 code paths assume AVX2 beside them; below it, SSE4.2 only.
        on &= {"GGML_SSE42"}
    if "GGML_AVX512" not in on:
        on -= {"GGML_AVX512_VBMI", "GGML_AVX512_VNNI", "GGML_AVX512_BF16"}
    return [opt for opt in X86_OPTIONS if opt in on and opt not in REFUSED]


def build_name(on: list[str]) -> str:
    """A short name of a build, e.g. ``avx512-vnni-bf16``, ``avx2``, ``sse42``, ``baseline``."""
    if "GGML_AVX512" in on:
        name = "avx512" + "".join(f"-{ext}" for opt, ext in (
            ("GGML_AVX512_VBMI", "vbmi"), ("GGML_AVX512_VNNI", "vnni"),
            ("GGML_AVX512_BF16", "bf16")) if opt in on)
    elif "GGML_AVX2" in on:
        name = "avx2"
    elif "GGML_SSE42" in on:
        return "sse42"
    else:
        return "baseline"
    if "GGML_AVX_VNNI" in on:
        name += "-avxvnni"
    if "GGML_BMI2" not in on:
        name += "-nobmi2"
    return name


def flags(cpu: set[str]) -> tuple[str, list[str]]:
    """The best safe build for a CPU with these ``/proc/cpuinfo`` flags: its name and the
    CMake arguments (``-DGGML_NATIVE=OFF`` and every x86 option ON or OFF)."""
    on = enabled(cpu)
    args = ["-DGGML_NATIVE=OFF"] + [f"-D{opt}={'ON' if opt in on else 'OFF'}"
                                    for opt in X86_OPTIONS]
    return build_name(on), args


def build_key(name: str, args: list[str]) -> str:
    """Name plus a digest of the arguments: what a cached wheel or build folder is kept under,
    so that nothing built with other flags is ever reused."""
    return f"{name}-{hashlib.sha256(';'.join(args).encode()).hexdigest()[:8]}"


def system_info_features(info: str) -> dict[str, str]:
    """``llama_print_system_info()`` as ``{feature: value}`` (``CPU : AVX = 1 | ...``)."""
    features = {}
    for part in info.replace("\n", "|").split("|"):
        if " : " in part:  # the backend's name leads its first feature
            part = part.split(" : ", 1)[1]
        key, sep, value = part.partition("=")
        if sep and key.strip():
            features[key.strip()] = value.strip()
    return features


def mismatches(args: list[str], features: dict[str, str]) -> list[str]:
    """How a loaded library's features differ from the build that was asked for."""
    wrong = []
    for arg in args:
        opt, _, state = arg[2:].partition("=")
        name = SYSTEM_INFO_NAME.get(opt)
        if name is None:
            continue
        has = features.get(name) == "1"
        if has != (state == "ON"):
            wrong.append(f"{name} is {'on' if has else 'off'} but the build asked {state}")
    return wrong


def _read_cpu(path: str) -> set[str]:
    return cpuinfo_flags(Path(path).read_text())


def _small_model() -> Path | None:
    """The assembled 0.5B GGUF, when the project's model cache has it."""
    root = Path(__file__).resolve().parent.parent
    sys.path.insert(0, str(root))
    try:
        from backends.models import CATALOG, cache_dir, is_assembled
    finally:
        sys.path.remove(str(root))
    model = CATALOG["qwen2.5-coder-0.5b-instruct-q4_k_m"]
    return cache_dir() / f"{model.name}.gguf" if is_assembled(model) else None


def prove(args: argparse.Namespace) -> int:
    """Load the installed llama_cpp, check its features against the build, decode one token
    on a real GGUF when one is there, and record the build next to the environment."""
    name, cmake_args = flags(_read_cpu(args.cpuinfo))
    import llama_cpp

    info = llama_cpp.llama_print_system_info().decode()
    features = system_info_features(info)
    print(f"llamacpp_build: llama.cpp system info: {info.strip()}", file=sys.stderr)
    wrong = mismatches(cmake_args, features)
    if wrong:
        print(f"llamacpp_build: the installed llama.cpp is not the '{name}' build: "
              + "; ".join(wrong), file=sys.stderr)
        return 1
    model = Path(args.model) if args.model else _small_model()
    decoded = None
    if model is not None:
        t0 = time.monotonic()
        llm = llama_cpp.Llama(str(model), n_ctx=64, n_threads=1,  # a proof, not a race
                              verbose=False)
        out = llm.create_completion("def add(a, b):", max_tokens=1, temperature=0.0)
        assert isinstance(out, dict)  # not streamed
        decoded = out["choices"][0]["text"]
        print(f"llamacpp_build: one-token decode on {model.name}: {decoded!r} "
              f"({time.monotonic() - t0:.1f} s with loading)", file=sys.stderr)
        if out["usage"]["completion_tokens"] != 1:
            print("llamacpp_build: the decode produced no token", file=sys.stderr)
            return 1
    else:
        print("llamacpp_build: no assembled model yet: checked the import and the features only",
              file=sys.stderr)
    record = {
        "build": name, "key": build_key(name, cmake_args), "cmake_args": cmake_args,
        "llama_cpp_python": args.version, "wheel": args.wheel,
        "features": sorted(k for k, v in features.items() if v == "1"),
        "decode_checked": decoded is not None,
    }
    Path(args.record).write_text(json.dumps(record, indent=2) + "\n")
    print(f"llamacpp_build: llama.cpp build '{name}' works; recorded in {args.record}",
          file=sys.stderr)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("command", choices=["shell", "show", "prove"])
    parser.add_argument("--cpuinfo", default="/proc/cpuinfo")
    parser.add_argument("--record", help="prove: the JSON file to write")
    parser.add_argument("--version", default="", help="prove: the llama-cpp-python version")
    parser.add_argument("--wheel", default=None, help="prove: the wheel installed")
    parser.add_argument("--model", default=None, help="prove: a GGUF to decode one token with")
    args = parser.parse_args(argv)
    if args.command == "prove":
        if not args.record:
            parser.error("prove needs --record")
        return prove(args)
    cpu = _read_cpu(args.cpuinfo)
    name, cmake_args = flags(cpu)
    if args.command == "shell":
        print(f"build_name={shlex.quote(name)}; build_key={shlex.quote(build_key(name, cmake_args))}; "
              f"cmake_args={shlex.quote(';'.join(cmake_args))}")
    else:
        advertised = sorted(f for f in cpu if f.startswith(("avx512", "amx", "avx_vnni")))
        print(f"build {name}: {' '.join(cmake_args)}")
        print(f"cpu advertises: avx2={'avx2' in cpu} {' '.join(advertised)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
