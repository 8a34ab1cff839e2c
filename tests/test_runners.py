"""edgeq.runners: one entry point (profile_model), the reach registry, profile defaults filled in one
place (resolve), valid random inputs for models that look tokens up (device_bench), and the real
samples kept next to a model used by default. Runs on this host with the real LiteRT interpreter."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from edgeq.errors import EdgeqError, ProfileError
from edgeq.manifest import SCHEMA as MANIFEST_SCHEMA, manifest_path
from edgeq.profiles import Reach, list_profiles, load_profile
from edgeq.runners import (DELEGATE_ARGS, RUNNERS, BenchOptions, InputSource, ProfileRequest, profile_model,
                           reach_of, resolve)
from edgeq.runners import device_bench

VOCAB, SEQ = 50, 6


def build_token_model(tf, path: Path, dynamic_range: bool = False) -> Path:
    """A seeded tiny "encoder": int32 token ids -> Embedding (a GATHER into a 50-row table), pooled
    with an int32 0/1 attention mask, -> Dense(3). Keras adds its negative-id fix-up (LESS/ADD/
    SELECT_V2) in front of the GATHER, as real exported encoders do."""
    tf.keras.utils.set_random_seed(0)
    ids = tf.keras.Input((SEQ,), dtype="int32", name="ids")
    mask = tf.keras.Input((SEQ,), dtype="int32", name="mask")
    emb = tf.keras.layers.Embedding(VOCAB, 8)(ids)
    m = tf.keras.ops.expand_dims(tf.keras.ops.cast(mask, "float32"), -1)
    out = tf.keras.layers.Dense(3)(tf.keras.ops.sum(emb * m, axis=1))
    conv = tf.lite.TFLiteConverter.from_keras_model(tf.keras.Model([ids, mask], out))
    if dynamic_range:
        conv.optimizations = [tf.lite.Optimize.DEFAULT]  # int8 table and weights, float activations
    from edgeq.quiet import quiet_native
    with quiet_native():
        path.write_bytes(conv.convert())
    return path


@pytest.fixture(scope="module")
def token_models(tf, tmp_path_factory):
    d = tmp_path_factory.mktemp("tokens")
    return {"float": build_token_model(tf, d / "enc.tflite"),
            "dynamic": build_token_model(tf, d / "enc_dr.tflite", dynamic_range=True)}


def interpreter(model):
    from ai_edge_litert.interpreter import Interpreter
    it = Interpreter(model_path=str(model))
    it.allocate_tensors()
    return it


def host_run(model, feed: dict) -> np.ndarray:
    it = interpreter(model)
    for d in it.get_input_details():
        it.set_tensor(d["index"], feed[d["name"]])
    it.invoke()
    return it.get_tensor(it.get_output_details()[0]["index"])


def write_manifest(model: Path, samples) -> Path:
    path = manifest_path(model)
    path.write_text(json.dumps({"schema": MANIFEST_SCHEMA, "samples": samples}))
    return path


# ----------------------------------------------------------------------------- registry and defaults
def test_every_reach_has_a_runner_and_every_profile_resolves(tmp_path):
    model = tmp_path / "m.tflite"
    assert set(RUNNERS) == set(DELEGATE_ARGS) == {r.value for r in Reach}
    for prof in list_profiles():
        reach = reach_of(prof)
        assert reach in RUNNERS, prof.id
        if prof.id == "android-qnn-htp":  # a vendor delegate edgeq cannot select in benchmark_model
            with pytest.raises(ProfileError, match="external delegate"):
                resolve(model, prof, ProfileRequest(), reach)
            continue
        o = resolve(model, prof, ProfileRequest(), reach)
        assert (o.threads, o.warmup, o.runs) == (prof.threads, prof.bench.warmup, prof.bench.runs), prof.id
    assert reach_of(None) == "local"


def test_resolve_fills_the_profile_and_maps_the_delegate_in_one_place(tmp_path):
    model = tmp_path / "m.tflite"
    rpi5, coral, host = load_profile("rpi5"), load_profile("coral-edgetpu"), load_profile("host-x86_64")
    assert resolve(model, rpi5, ProfileRequest(), "ssh") == BenchOptions(
        threads=4, warmup=10, runs=50, delegate="xnnpack", runtime="ai-edge-litert")
    assert resolve(model, coral, ProfileRequest(), "ssh").delegate == "libedgetpu.so.1"
    o = resolve(model, rpi5, ProfileRequest(threads=1, warmup=0, runs=3, delegate="none", runtime="tflite-runtime",
                                            seed=4), "ssh")
    assert (o.threads, o.warmup, o.runs, o.delegate, o.runtime, o.seed) == (1, 0, 3, "none", "tflite-runtime", 4)
    assert o.args() == ["--threads", "1", "--warmup", "0", "--runs", "3", "--delegate", "none",
                        "--runtime", "tflite-runtime", "--seed", "4"]
    assert resolve(model, host, ProfileRequest(), "local").runtime == "auto"  # this host: what is installed
    assert resolve(model, None, ProfileRequest(), "local") == BenchOptions()  # edgeq bench without a profile
    with pytest.raises(ProfileError, match="cannot select in device_bench"):
        resolve(model, load_profile("android-gpu"), ProfileRequest(), "local")
    with pytest.raises(EdgeqError, match="inputs file not found"):
        resolve(model, host, ProfileRequest(inputs=tmp_path / "none.npz"), "local")
    with pytest.raises(EdgeqError, match="must not overwrite the model"):
        resolve(model, host, ProfileRequest(save_outputs=model), "local")


# ----------------------------------------------------------------------------- valid random inputs
def test_random_token_ids_stay_inside_the_embedding_table(token_models):
    for kind, model in token_models.items():
        it = interpreter(model)
        ids, mask = sorted(it.get_input_details(), key=lambda d: d["name"])
        assert device_bench.index_bounds(it, np) == {ids["index"]: VOCAB}, kind  # the mask feeds no lookup
        feed = device_bench.make_inputs([ids, mask], np.random.default_rng(3), np,
                                        device_bench.index_bounds(it, np))
        assert feed[0].dtype == np.int32 and 0 <= feed[0].min() and feed[0].max() < VOCAB
        assert set(np.unique(feed[1])) <= {0, 1}
        # What the runner fed before (the dtype's range clipped to [-128, 255]) fails in the GATHER.
        old = np.random.default_rng(0).integers(-128, 256, size=(1, SEQ)).astype(np.int32)
        it.set_tensor(ids["index"], old)
        it.set_tensor(mask["index"], np.ones((1, SEQ), np.int32))
        with pytest.raises(RuntimeError, match="GATHER"):
            it.invoke()


def test_quantized_integer_inputs_keep_their_full_range():
    detail = {"index": 0, "name": "x", "shape": [1, 64], "dtype": np.int8, "quantization": (0.02, -3)}
    x = device_bench.make_inputs([detail], np.random.default_rng(0), np)[0]
    assert x.dtype == np.int8 and x.min() < -100 and x.max() > 100  # real values, not ids or flags


def test_bench_runs_a_token_model_with_random_inputs(token_models):
    r = profile_model(token_models["float"], None, ProfileRequest(runs=5, warmup=1))
    assert r["input_source"] == "random" and r["input_samples"] == 1 and r["runs"]["count"] == 5
    assert [i["dtype"] for i in r["inputs"]] == ["int32", "int32"]


# ----------------------------------------------------------------------------- samples next to the model
def test_samples_next_to_the_model_are_used_by_default(token_models, tmp_path):
    model = tmp_path / "enc.tflite"
    model.write_bytes(token_models["dynamic"].read_bytes())
    rng = np.random.default_rng(11)
    ids = rng.integers(0, VOCAB, size=(4, 1, SEQ)).astype(np.int32)  # 4 samples, stacked
    mask = (rng.random((4, 1, SEQ)) < 0.7).astype(np.int32)
    names = {d["name"]: d["name"] for d in interpreter(model).get_input_details()}
    ids_name = next(n for n in names if "ids" in n)
    mask_name = next(n for n in names if "mask" in n)
    np.savez(tmp_path / "enc.samples.npz", **{ids_name: ids, mask_name: mask})
    write_manifest(model, {"file": "enc.samples.npz", "count": 4})
    out = tmp_path / "out.npz"
    r = profile_model(model, None, ProfileRequest(runs=6, warmup=1, save_outputs=out))
    assert r["input_source"] == "samples" and r["inputs_file"] == "enc.samples.npz" and r["input_samples"] == 4
    last = (1 + 1 + 6 - 1) % 4  # first + warmup + runs, each run takes the next sample
    want = host_run(model, {ids_name: ids[last], mask_name: mask[last]})
    np.testing.assert_allclose(np.load(out)["arr_0"], want, rtol=1e-6)
    # --inputs wins over the samples; a plain file name is also accepted in the manifest
    write_manifest(model, "enc.samples.npz")
    np.savez(tmp_path / "one.npz", **{ids_name: ids[0], mask_name: mask[0]})
    r = profile_model(model, None, ProfileRequest(runs=2, warmup=0, inputs=tmp_path / "one.npz"))
    assert r["input_source"] == "file" and r["input_samples"] == 1 and "inputs_file" not in r


def test_a_manifest_naming_missing_or_foreign_samples_is_an_error(token_models, tmp_path):
    model = tmp_path / "enc.tflite"
    model.write_bytes(token_models["float"].read_bytes())
    write_manifest(model, "enc.samples.npz")
    with pytest.raises(EdgeqError, match="names samples enc.samples.npz, which is missing; .*--inputs"):
        profile_model(model, None, ProfileRequest(runs=1))
    write_manifest(model, "../elsewhere/x.npz")
    with pytest.raises(EdgeqError, match="must name an .npz next to the model"):
        profile_model(model, None, ProfileRequest(runs=1))
    write_manifest(model, None)  # no samples: random
    assert profile_model(model, None, ProfileRequest(runs=1, warmup=0))["input_source"] == "random"
    manifest_path(model).write_text("{not json")
    with pytest.raises(EdgeqError, match="cannot read manifest"):
        profile_model(model, None, ProfileRequest(runs=1))


def test_samples_with_another_count_per_input_are_refused(token_models, tmp_path):
    model = token_models["float"]
    names = [d["name"] for d in interpreter(model).get_input_details()]
    np.savez(tmp_path / "bad.npz", **{names[0]: np.zeros((3, 1, SEQ), np.int32),
                                      names[1]: np.zeros((2, 1, SEQ), np.int32)})
    with pytest.raises(EdgeqError, match="different sample counts per input"):
        profile_model(model, None, ProfileRequest(runs=1, inputs=tmp_path / "bad.npz"))


# ----------------------------------------------------------------------------- the CLI: one library call
def run_cli(*args):
    from edgeq.cli import main
    return CliRunner().invoke(main, [str(a) for a in args])


def test_cli_bench_and_profile_on_a_token_model(token_models, tmp_path):
    r = run_cli("bench", token_models["float"], "--runs", 3, "--warmup", 0, "--json")
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["input_source"] == InputSource.RANDOM.value
    host = load_profile("host-x86_64")
    r = run_cli("profile", token_models["float"], "--device", "host-x86_64", "--json")
    assert r.exit_code == 0, r.output
    doc = json.loads(r.stdout)
    assert doc["runs"]["count"] == host.bench.runs and doc["threads"] == host.threads
    r = run_cli("bench", token_models["float"], "--runs", 2, "--warmup", 0)
    assert r.exit_code == 0 and "inputs: random" in r.output


@pytest.mark.parametrize("args,msg", [
    ([], "pass either --device ID"),
    (["--device", "rpi4"], "rpi4 is reached over ssh: pass --host"),
    (["--device", "host-x86_64", "--host", "pi@pi"], "--host is for ssh devices"),
    (["--device", "rpi4", "--fleet", "f.toml"], "pass either --device ID"),
    (["--fleet", "f.toml", "--host", "pi@pi"], "--fleet FILE names every device"),
    (["--device", "android-nnapi", "--save-outputs", "o.npz"], "not supported on Android phones yet"),
])
def test_cli_profile_usage_mistakes_exit_2(token_models, args, msg):
    r = run_cli("profile", token_models["float"], *args)
    assert r.exit_code == 2 and msg in r.output and "Traceback" not in r.output


@pytest.mark.slow
def test_bench_runs_the_encoder_edgeq_convert_produces(minilm_dir, tmp_path):
    """The issue's case: all-MiniLM-L6-v2 converted by `edgeq convert`, then `edgeq bench` on it.
    Random int32 over the old range made GATHER_ND fail; the ids now stay below the vocabulary."""
    out = tmp_path / "encoder.tflite"
    r = run_cli("convert", minilm_dir, "-o", out, "--seq-len", 16, "-q")
    assert r.exit_code == 0, r.output
    it = interpreter(out)
    bounds = {d["name"]: device_bench.index_bounds(it, np).get(d["index"]) for d in it.get_input_details()}
    assert bounds["serving_default_input_ids"] == 30522  # the vocabulary: rows of the word-embedding table
    r = run_cli("bench", out, "--runs", 3, "--warmup", 1, "--json")
    assert r.exit_code == 0, r.output
    doc = json.loads(r.stdout)
    assert doc["runs"]["count"] == 3 and doc["runs"]["median_ms"] > 0
    assert doc["input_source"] in ("random", "samples")  # samples once convert writes them
