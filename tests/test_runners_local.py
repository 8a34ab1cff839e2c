"""The device-side bench script, run locally in a subprocess with the real LiteRT interpreter."""

from __future__ import annotations

import numpy as np
import pytest

from tests.conftest import build_tiny
from edgeq.errors import DeviceError, ModelFormatError
from edgeq.runners import BenchOptions
from edgeq.runners.local import bench_local


@pytest.fixture(scope="module")
def int8_model(tf, tmp_path_factory):
    from edgeq.sources import load_source
    from edgeq.quantize import QuantizeRequest, Scheme, quantize, IoType
    from tests.conftest import save_keras
    d = tmp_path_factory.mktemp("bench")
    src = load_source(save_keras(tf, build_tiny(tf, "conv"), d / "c.keras"))
    rng = np.random.default_rng(0)
    samples = [{src.inputs[0].name: rng.random((1, 8, 8, 3)).astype(np.float32)} for _ in range(30)]
    q = quantize(src, QuantizeRequest(Scheme.INT8, IoType.INT8), lambda: iter(samples))
    (d / "q.tflite").write_bytes(q)
    (d / "f.tflite").write_bytes(src.float_tflite)
    return d


def test_bench_statistics(int8_model):
    r = bench_local(int8_model / "q.tflite", BenchOptions(threads=2, warmup=3, runs=25))
    assert r["schema"] == "edgeq.bench/1" and r["runner"] == "local"
    assert r["runtime"] == {"name": "ai-edge-litert", "version": "2.3.0"}
    assert r["threads"] == 2 and r["delegate"] == "xnnpack"
    s = r["runs"]
    assert s["count"] == 25 == len(r["timings_ms"])
    assert 0 < s["min_ms"] <= s["p5_ms"] <= s["median_ms"] <= s["p95_ms"] <= s["max_ms"]
    assert s["min_ms"] <= s["mean_ms"] <= s["max_ms"]
    assert s["median_ms"] == pytest.approx(float(np.median(r["timings_ms"])))
    assert s["std_ms"] == pytest.approx(float(np.std(r["timings_ms"])))
    assert r["warmup"]["count"] == 3 and r["init_ms"] > 0 and r["first_inference_ms"] > 0
    assert r["memory_mb"]["peak_rss"] > 10
    assert r["inputs"] == [{"name": r["inputs"][0]["name"], "shape": [1, 8, 8, 3], "dtype": "int8"}]
    assert r["model_bytes"] == (int8_model / "q.tflite").stat().st_size


def test_bench_inputs_file_makes_outputs_deterministic(int8_model, tmp_path):
    x = np.random.default_rng(5).integers(-128, 128, (1, 8, 8, 3)).astype(np.int8)
    np.savez(tmp_path / "in.npz", arr_0=x)
    a = bench_local(int8_model / "q.tflite", BenchOptions(runs=2, warmup=0, inputs=tmp_path / "in.npz"))
    b = bench_local(int8_model / "q.tflite", BenchOptions(runs=2, warmup=0, delegate="none",
                                                          inputs=tmp_path / "in.npz"))
    c = bench_local(int8_model / "q.tflite", BenchOptions(runs=2, warmup=0, seed=1))
    assert a["input_source"] == "file" and c["input_source"] == "random"
    assert a["outputs_sha256"] == b["outputs_sha256"] != c["outputs_sha256"]
    assert b["delegate"] == "none"


def test_bench_errors(int8_model, tmp_path):
    bad = tmp_path / "bad.tflite"
    bad.write_bytes(b"nope")
    with pytest.raises(ModelFormatError, match="not a TFLite flatbuffer"):
        bench_local(bad)
    with pytest.raises(DeviceError, match="cannot load delegate"):
        bench_local(int8_model / "q.tflite", BenchOptions(runs=1, delegate=str(tmp_path / "nodelegate.so")))


def test_float_inputs_are_quantized_for_an_int8_input(int8_model, tmp_path):
    """Float data fed to an int8-input model must go through its scale/zero point, not a cast."""
    from ai_edge_litert.interpreter import Interpreter
    x = np.random.default_rng(7).random((1, 8, 8, 3)).astype(np.float32)
    np.savez(tmp_path / "f.npz", arr_0=x)
    d = Interpreter(model_path=str(int8_model / "q.tflite")).get_input_details()[0]
    scale, zp = d["quantization"]
    q = np.clip(np.round(x / scale + zp), -128, 127).astype(np.int8)
    np.savez(tmp_path / "q.npz", arr_0=q)
    a = bench_local(int8_model / "q.tflite", BenchOptions(runs=1, warmup=0, inputs=tmp_path / "f.npz"))
    b = bench_local(int8_model / "q.tflite", BenchOptions(runs=1, warmup=0, inputs=tmp_path / "q.npz"))
    assert a["outputs_sha256"] == b["outputs_sha256"]
    np.savez(tmp_path / "batch.npz", arr_0=np.zeros((4, 8, 8, 3), np.float32))
    from edgeq.errors import EdgeqError
    with pytest.raises(EdgeqError, match=r"needs shape \[1, 8, 8, 3\]") as e:
        bench_local(int8_model / "q.tflite", BenchOptions(runs=1, inputs=tmp_path / "batch.npz"))
    assert e.value.exit_code == 1


def test_saved_outputs_are_whole_or_absent(int8_model, tmp_path):
    """--save-outputs on this host: the outputs of the run, written by rename; nothing on a failure."""
    from ai_edge_litert.interpreter import Interpreter
    x = np.random.default_rng(9).integers(-128, 128, (1, 8, 8, 3)).astype(np.int8)
    np.savez(tmp_path / "in.npz", arr_0=x)
    out = tmp_path / "res" / "out.npz"
    bench_local(int8_model / "q.tflite", BenchOptions(runs=1, warmup=0, inputs=tmp_path / "in.npz", save_outputs=out))
    it = Interpreter(model_path=str(int8_model / "q.tflite"))
    it.allocate_tensors()
    it.set_tensor(it.get_input_details()[0]["index"], x)
    it.invoke()
    np.testing.assert_array_equal(np.load(out)["arr_0"], it.get_tensor(it.get_output_details()[0]["index"]))
    failed = tmp_path / "failed.npz"
    with pytest.raises(DeviceError, match="cannot load delegate"):
        bench_local(int8_model / "q.tflite", BenchOptions(runs=1, delegate=str(tmp_path / "no.so"), save_outputs=failed))
    assert not failed.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["in.npz", "res"]


def test_cpu_features_from_cpuinfo():
    """x86 `flags` and ARM `Features` lines: the int8-dot-product features that decide XNNPACK's kernels."""
    from edgeq.runners.device_bench import cpu_features

    x86 = "processor\t: 0\nflags\t\t: fpu sse avx2 fma avx_vnni avx512f\nprocessor\t: 1\nflags\t\t: fpu avx2 fma\n"
    assert cpu_features(x86) == ["avx2", "fma", "avx_vnni", "avx512f"]
    pi5 = "processor\t: 0\nBogoMIPS\t: 108.00\nFeatures\t: fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics asimdhp asimddp\n"
    assert cpu_features(pi5) == ["asimddp"]
    pi4 = "Features\t: fp asimd evtstrm crc32 cpuid\n"
    assert cpu_features(pi4) == []
