"""The bootstrap's CPU detection (backends/llamacpp_build.py): which llama.cpp build a CPU gets, and
`joulegate models --info`, which shows the build in use."""

from __future__ import annotations

import json

import pytest

from backends import llamacpp_build as cpu_build
from backends.models import CATALOG
from gateway.cli import main
from gateway.cli import models as models_cli

pytestmark = pytest.mark.unit


# This machine's kind: an AMD EPYC VM with AVX2 and nothing wider.
EPYC_AVX2 = set("fpu sse sse2 ssse3 fma cx16 sse4_1 sse4_2 popcnt aes xsave avx f16c "
                "bmi1 avx2 bmi2 adx sha_ni".split())
AVX512 = {"avx512f", "avx512cd", "avx512vl", "avx512dq", "avx512bw"}
# A Sapphire Rapids VM: everything, AMX advertised (and not granted by the hypervisor).
SAPPHIRE_RAPIDS = EPYC_AVX2 | AVX512 | {
    "avx512vbmi", "avx512_vnni", "avx512_bf16", "avx_vnni", "amx_tile", "amx_int8", "amx_bf16"}
ALL_OFF = dict.fromkeys(cpu_build.X86_OPTIONS, "OFF")


def _on(*opts: str) -> dict[str, str]:
    return {**ALL_OFF, **dict.fromkeys(opts, "ON")}


AVX2_ON = ("GGML_SSE42", "GGML_AVX", "GGML_AVX2", "GGML_FMA", "GGML_F16C", "GGML_BMI2")


@pytest.mark.parametrize(("cpu", "name", "options"), [
    pytest.param(EPYC_AVX2, "avx2", _on(*AVX2_ON), id="avx2"),
    pytest.param(EPYC_AVX2 | AVX512, "avx512", _on(*AVX2_ON, "GGML_AVX512"), id="avx512"),
    pytest.param(EPYC_AVX2 | AVX512 | {"avx512_vnni"}, "avx512-vnni",
                 _on(*AVX2_ON, "GGML_AVX512", "GGML_AVX512_VNNI"), id="avx512-vnni"),
    pytest.param(EPYC_AVX2 | AVX512 | {"avx512_vnni", "avx512_bf16"}, "avx512-vnni-bf16",
                 _on(*AVX2_ON, "GGML_AVX512", "GGML_AVX512_VNNI", "GGML_AVX512_BF16"),
                 id="avx512-vnni-bf16"),
    pytest.param(SAPPHIRE_RAPIDS, "avx512-vbmi-vnni-bf16-avxvnni",
                 _on(*AVX2_ON, "GGML_AVX_VNNI", "GGML_AVX512", "GGML_AVX512_VBMI",
                     "GGML_AVX512_VNNI", "GGML_AVX512_BF16"), id="sapphire-rapids-no-amx"),
    # AVX-512F alone is not the AVX-512 build: ggml compiles for F, CD, VL, DQ and BW.
    pytest.param(EPYC_AVX2 | {"avx512f", "avx512_vnni", "avx512_bf16"}, "avx2", _on(*AVX2_ON),
                 id="avx512f-without-bw-vl"),
    pytest.param(EPYC_AVX2 - {"bmi2"}, "avx2-nobmi2",
                 _on(*(o for o in AVX2_ON if o != "GGML_BMI2")), id="avx2-without-bmi2"),
    # AVX2 without FMA/F16C is not the AVX2 build, nor is AVX alone.
    pytest.param(EPYC_AVX2 - {"fma"}, "sse42", _on("GGML_SSE42"), id="avx2-without-fma"),
    pytest.param({"sse4_2", "avx"}, "sse42", _on("GGML_SSE42"), id="sandy-bridge"),
    pytest.param(set(), "baseline", ALL_OFF, id="no-flags-not-x86"),
])
def test_build_for_flags(cpu, name, options):
    got_name, args = cpu_build.flags(cpu)
    assert got_name == name
    assert args[0] == "-DGGML_NATIVE=OFF"
    assert dict(a[2:].split("=") for a in args[1:]) == options


@pytest.mark.parametrize("amx", [{"amx_tile"}, {"amx_tile", "amx_int8", "amx_bf16"}])
def test_amx_is_refused_whatever_the_cpu_advertises(amx):
    for cpu in (EPYC_AVX2 | amx, SAPPHIRE_RAPIDS | amx):
        _, args = cpu_build.flags(cpu)
        assert {"-DGGML_AMX_TILE=OFF", "-DGGML_AMX_INT8=OFF", "-DGGML_AMX_BF16=OFF"} <= set(args)
        assert "-DGGML_NATIVE=ON" not in args and not any("AMX" in a and "ON" in a for a in args)


def test_cpuinfo_flags_are_what_every_processor_has():
    text = ("processor\t: 0\nflags\t\t: fpu avx avx2 avx512f\n\n"
            "processor\t: 1\nflags\t\t: fpu avx avx2\nbugs\t\t: spectre\n")
    assert cpu_build.cpuinfo_flags(text) == {"fpu", "avx", "avx2"}
    assert cpu_build.cpuinfo_flags("Features\t: neon asimd\n") == set()


def test_different_flags_never_share_a_build_key():
    keys = {cpu_build.build_key(*cpu_build.flags(cpu))
            for cpu in (EPYC_AVX2, EPYC_AVX2 | AVX512, SAPPHIRE_RAPIDS, EPYC_AVX2 - {"bmi2"})}
    assert len(keys) == 4
    assert cpu_build.build_key(*cpu_build.flags(EPYC_AVX2)).startswith("avx2-")


def test_system_info_is_checked_against_the_build():
    info = ("CPU : SSE3 = 1 | SSSE3 = 1 | AVX = 1 | AVX2 = 1 | F16C = 1 | FMA = 1 | BMI2 = 1 | "
            "LLAMAFILE = 1 | OPENMP = 1 | REPACK = 1 | ")
    features = cpu_build.system_info_features(info)
    assert features["AVX2"] == "1" and "AVX512" not in features and features["OPENMP"] == "1"
    assert cpu_build.mismatches(cpu_build.flags(EPYC_AVX2)[1], features) == []
    wrong = cpu_build.mismatches(cpu_build.flags(EPYC_AVX2 | AVX512 | {"avx512_vnni"})[1],
                                 features)
    assert wrong == ["AVX512 is off but the build asked ON", "AVX512_VNNI is off but the build asked ON"]
    amx = cpu_build.system_info_features(info + "AMX_INT8 = 1 | ")
    assert cpu_build.mismatches(cpu_build.flags(SAPPHIRE_RAPIDS)[1], amx)[-1] == (
        "AMX_INT8 is on but the build asked OFF")


# -- `joulegate models --info`: the build in use -------------------------------------------------

AVX512_INFO = ("CPU : SSE3 = 1 | SSSE3 = 1 | AVX = 1 | AVX2 = 1 | F16C = 1 | FMA = 1 | BMI2 = 1 | "
               "AVX512 = 1 | AVX512_VNNI = 1 | AVX512_BF16 = 1 | OPENMP = 1 | REPACK = 1 | ")


def test_info_names_the_features_in_use_and_the_recorded_build(tmp_path):
    name, args = cpu_build.flags(EPYC_AVX2 | AVX512 | {"avx512_vnni", "avx512_bf16"})
    (tmp_path / models_cli.BUILD_RECORD).write_text(json.dumps(
        {"build": name, "cmake_args": args, "llama_cpp_python": "0.3.36"}))
    record = models_cli.build_record(tmp_path)
    lines = models_cli.describe_build(("0.3.36", AVX512_INFO), record,
                                      tmp_path / models_cli.BUILD_RECORD)
    assert lines[0].startswith("llama.cpp: llama-cpp-python 0.3.36, build 'avx512-vnni-bf16'")
    simd = lines[1].split()
    assert simd[simd.index("AVX512") + 1] == "yes" and simd[simd.index("AVX512_VNNI") + 1] == "yes"
    assert simd[simd.index("AVX_VNNI") + 1] == "no" and simd[simd.index("AMX_INT8") + 1] == "no"
    assert lines[2] == ("  features in use: SSE3 SSSE3 AVX AVX2 F16C FMA BMI2 AVX512 AVX512_VNNI "
                        "AVX512_BF16 OPENMP REPACK")
    assert lines[3].startswith("  cmake: -DGGML_NATIVE=OFF ") and "-DGGML_AMX_INT8=OFF" in lines[3]


def test_info_without_a_record_or_without_llama_cpp(tmp_path):
    assert models_cli.build_record(tmp_path) is None
    (tmp_path / models_cli.BUILD_RECORD).write_text("not json")
    assert models_cli.build_record(tmp_path) is None
    lines = models_cli.describe_build(("0.3.36", AVX512_INFO), None, tmp_path)
    assert "build not recorded" in lines[0]
    assert models_cli.describe_build(None, None, tmp_path)[0].startswith(
        "llama.cpp: not installed")


def test_models_info_reports_the_loaded_library_and_the_models(capsys):
    assert main(["models", "--info"]) == 0
    out = capsys.readouterr().out.splitlines()
    import llama_cpp

    assert out[0].startswith(f"llama.cpp: llama-cpp-python {llama_cpp.__version__}")
    live = cpu_build.system_info_features(llama_cpp.llama_print_system_info().decode())
    assert out[2] == "  features in use: " + " ".join(k for k, v in live.items() if v == "1")
    assert "AMX_INT8 no" in out[1]  # the bootstrap never builds AMX in
    assert any(line.startswith("models in ") for line in out)
    for model in CATALOG:
        assert any(line.startswith(model) for line in out)
