"""TensorRT readiness: accepted and rejected graphs built here, real ORT quantizer output,
and the honest absence of an engine where tensorrt cannot be installed."""
import os
import subprocess
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

import edgeport as ep
from edgeport.export.tensorrt import Readiness, builder_flags, check_readiness, tensorrt_module, trtexec_command
from edgeport.export.tensorrt import TensorRTRunner, width_caveat


def qdq_model(path, *, zero=0, zero_type=np.int8, act_scale=np.float32(0.05), weight_axis=1, scale_as_input=False,
              extra_nodes=()):
    """x[1,16] -> Q/DQ -> MatMul(W: int8 [16, 8], per-channel DQ) -> y[1, 8]."""
    weight = (np.arange(128).reshape(16, 8) % 7 - 3).astype(np.int8)
    channels = weight.shape[weight_axis]
    inits = [numpy_helper.from_array(np.asarray(act_scale, np.float32), "act_scale"),
             numpy_helper.from_array(np.asarray(zero, zero_type), "act_zero"),
             numpy_helper.from_array(weight, "w_int8"),
             numpy_helper.from_array(np.full(channels, 0.02, np.float32), "w_scale"),
             numpy_helper.from_array(np.zeros(channels, np.int8), "w_zero")]
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 16])]
    if scale_as_input:
        inits = inits[1:]
        inputs.append(helper.make_tensor_value_info("act_scale", TensorProto.FLOAT, []))
    nodes = [helper.make_node("QuantizeLinear", ["x", "act_scale", "act_zero"], ["xq"], name="q_x"),
             helper.make_node("DequantizeLinear", ["xq", "act_scale", "act_zero"], ["xd"], name="dq_x"),
             helper.make_node("DequantizeLinear", ["w_int8", "w_scale", "w_zero"], ["w"], name="dq_w",
                              axis=weight_axis),
             helper.make_node("MatMul", ["xd", "w"], ["y"], name="matmul"), *extra_nodes]
    graph = helper.make_graph(nodes, "qdq", inputs, [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 8])],
                              inits)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), str(path))
    return path


def test_symmetric_int8_qdq_is_accepted(tmp_path):
    readiness = check_readiness(qdq_model(tmp_path / "ok.onnx"))
    assert readiness.ready and readiness.quantized, readiness.summary()
    assert readiness.dynamic_inputs == {"x": ["batch", 16]}


@pytest.mark.parametrize("options, rule, words", [
    ({"zero": 3}, "symmetric", "zero point 0"),
    ({"zero": 128, "zero_type": np.uint8}, "int8", "not UINT8"),
    ({"act_scale": np.full(16, 0.05, np.float32)}, "per-tensor-activations", "per tensor"),
    ({"weight_axis": 0}, "weight-axis", "output channels on axis 1"),
    ({"scale_as_input": True}, "constant-scale", "constant initializer"),
    ({"act_scale": np.float32(-0.05)}, "positive-scale", "positive"),
    ({"extra_nodes": [helper.make_node("Unique", ["y"], ["u"], name="unique")]}, "operator", "not implemented"),
    ({"extra_nodes": [helper.make_node("FusedMatMul", ["y", "y"], ["f"], name="fused", domain="com.microsoft")]},
     "operator", "plugin"),
])
def test_violations_are_named(options, rule, words, tmp_path):
    readiness = check_readiness(qdq_model(tmp_path / "bad.onnx", **options))
    assert not readiness.ready
    assert any(v.rule == rule and words in v.message for v in readiness.violations), readiness.summary()


def test_onnxruntime_default_static_quantization_is_rejected(tmp_path):
    """ORT's default QDQ output (uint8, asymmetric activations, int32 biases) is not
    TensorRT-legal; its symmetric int8 per-channel mode with float biases is."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    fp32 = ep.export("cnn-digits", out=tmp_path)["onnx"].path
    images = ep.zoo.calibration("cnn-digits", 8).numpy()

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.rows = iter([{"x": images[i:i + 1]} for i in range(8)])

        def get_next(self):
            return next(self.rows, None)

    quantize_static(str(fp32), str(tmp_path / "u8.onnx"), Reader(), quant_format=QuantFormat.QDQ, per_channel=True)
    rejected = check_readiness(tmp_path / "u8.onnx")
    assert not rejected.ready and {v.rule for v in rejected.violations} >= {"int8", "symmetric"}
    quantize_static(str(fp32), str(tmp_path / "s8.onnx"), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                    activation_type=QuantType.QInt8, weight_type=QuantType.QInt8,
                    extra_options={"ActivationSymmetric": True, "WeightSymmetric": True, "QuantizeBias": False})
    assert check_readiness(tmp_path / "s8.onnx").ready, check_readiness(tmp_path / "s8.onnx").summary()


def test_tensorrt_target_writes_readiness_and_trtexec(tmp_path):
    artifact = ep.export("cnn-digits", targets=["tensorrt"], out=tmp_path, dynamic_batch=True)["tensorrt"]
    settings = artifact.settings["tensorrt"]
    assert settings["readiness"]["ready"] and artifact.parity.passed
    script = tmp_path / "cnn-digits-tensorrt.trtexec.sh"
    command = script.read_text()
    assert "--onnx=cnn-digits-tensorrt.onnx" in command and "--minShapes=x:1x1x8x8" in command and "--maxShapes=x:8x1x8x8" in command
    assert 'cd "$(dirname "$0")"' in command and script.stat().st_mode & 0o111 and settings["precision"] == "fp16"
    with pytest.raises(ep.UserError, match="int8 needs a quantized model"):  # no implicit INT8 calibration
        ep.export("cnn-digits", targets=["tensorrt"], out=tmp_path / "int8", tensorrt_precision="int8")
    assert not (tmp_path / "int8").exists() or not any((tmp_path / "int8").iterdir())
    try:
        tensorrt_module()
    except ep.BackendUnavailable as unavailable:
        assert artifact.format == "onnx" and "not built here" in settings["engine"]
        assert "NVIDIA" in unavailable.remedy
        with pytest.raises(ep.BackendUnavailable, match="tensorrt"):
            TensorRTRunner(tmp_path / "cnn-digits-tensorrt.engine").load()


def test_the_script_and_the_api_build_with_the_same_precisions():
    """fp32 asked for on a quantized graph keeps fp16 off (int8 only: its Q/DQ scales); the
    trtexec script and the API build read one list."""
    assert builder_flags("fp32", quantized=True) == ["int8"]
    assert builder_flags("fp16", quantized=True) == ["fp16", "int8"]
    assert builder_flags("fp16", quantized=False) == ["fp16"] and builder_flags("fp32", quantized=False) == []
    readiness = Readiness("m.onnx", quantized=True)
    assert trtexec_command(Path("m.onnx"), readiness, "fp32").endswith("--int8")


def test_profile_max_stops_where_the_model_stops(tmp_path):
    """A BERT with 64 position embeddings, exported at sequence 32: 4x the example (128) would
    be a profile TensorRT cannot build, and the graph shows no bound; the ONNX file runs up to
    64 in ONNX Runtime, so the profile stops there and says why. The batch keeps 4x."""
    from hf_models import ARCHITECTURES

    model, (ids, mask) = ARCHITECTURES["bert"]()
    ids, mask = ids.repeat(1, 2), mask.repeat(1, 2)
    axes = {name: {0: "batch", 1: "sequence"} for name in ("input_ids", "attention_mask")}
    artifact = ep.export(model, (ids, mask), targets=["tensorrt"], out=tmp_path, name="bert",
                         dynamic_axes=axes)["tensorrt"]
    profile = artifact.settings["tensorrt"]["profiles"]["input_ids"]
    assert profile == [[1, 1], [2, 32], [8, 64]] or profile == ([1, 1], [2, 32], [8, 64])
    assert any("max for sequence is 64, not 128" in note for note in artifact.notes)
    command = (tmp_path / "bert-tensorrt.trtexec.sh").read_text()
    assert "--maxShapes=input_ids:8x64,attention_mask:8x64" in command


@pytest.mark.needs_tensorrt
@pytest.mark.skipif(not __import__("importlib").util.find_spec("tensorrt"),
                    reason="needs the tensorrt package and an NVIDIA GPU (not installable on the dev machines)")
def test_engine_builds_and_verifies(tmp_path):
    artifact = ep.export("cnn-digits", targets=["tensorrt"], out=tmp_path)["tensorrt"]
    assert artifact.format == "tensorrt" and artifact.path.suffix == ".engine" and artifact.parity.passed


def test_operators_the_parser_does_not_implement_make_a_file_not_ready(tmp_path):
    """The TensorRT 10.0 support matrix's "N" operators, an audio front end's STFT and a bitwise
    mask among them, are violations; RandomNormal, which 10.0 implements, is not."""
    for op, inputs, ready in (("BitwiseAnd", ["a", "a"], False), ("RandomNormalLike", ["a"], True)):
        node = helper.make_node(op, inputs, ["y"])
        dtype = TensorProto.INT32 if op.startswith("Bitwise") else TensorProto.FLOAT
        graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("a", dtype, [4])],
                                  [helper.make_tensor_value_info("y", dtype, [4])])
        onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), tmp_path / f"{op}.onnx")
        readiness = check_readiness(tmp_path / f"{op}.onnx")
        assert readiness.ready == ready
        if not ready:
            assert readiness.violations[0].rule == "operator" and "TensorRT 10.0" in readiness.violations[0].message


class TwoValidConvs(torch.nn.Module):
    """Two unpadded 3x3 convolutions: an image needs at least 5x5 pixels to pass."""

    def __init__(self):
        super().__init__()
        self.first, self.second = torch.nn.Conv2d(1, 4, 3), torch.nn.Conv2d(4, 4, 3)

    def forward(self, x):
        return self.second(torch.relu(self.first(x))).mean((2, 3))


def test_profile_min_rises_to_the_smallest_size_the_model_runs(tmp_path, capfd):
    """A profile min of 1x1 for a model whose convolutions need 5x5 is a profile TensorRT
    cannot build (it builds for every shape in the profile); the ONNX file fails below 5 in
    ONNX Runtime, so the min stops there and says why. The batch keeps its min of 1, and the
    failed probes leave nothing on the console."""
    torch.manual_seed(0)
    axes = {"x": {0: "batch", 2: "height", 3: "width"}}
    artifact = ep.export(TwoValidConvs(), (torch.randn(1, 1, 12, 12),), targets=["tensorrt"], out=tmp_path,
                         name="valid", dynamic_axes=axes)["tensorrt"]
    low, opt, high = artifact.settings["tensorrt"]["profiles"]["x"]
    assert (list(low), list(opt), list(high)) == ([1, 1, 5, 5], [1, 1, 12, 12], [8, 1, 48, 48])
    assert any("min for height is 5, not 1" in note for note in artifact.notes)
    assert "--minShapes=x:1x1x5x5" in (tmp_path / "valid-tensorrt.trtexec.sh").read_text()
    assert "Invalid input shape" not in capfd.readouterr().err


def test_narrow_widths_warn_when_exported_for_tensorrt(tmp_path):
    """W4A4 is kept in INT8 Q/DQ for TensorRT, which has no 4-bit activation kernels: the export
    says so (a warning and a note), not only the quantize call; W8A8 and W4A8 say nothing."""
    assert width_caveat("fp32") is None and width_caveat("w8a8") is None and width_caveat("w4a8") is None
    assert "TensorRT runs INT8 activations" in width_caveat("w8a4") and "W6A8" in width_caveat("w6a8")
    calibration = ep.zoo.calibration("cnn-digits", 16)
    with pytest.warns(ep.EdgeportWarning):
        quantized = ep.quantize(ep.zoo.load("cnn-digits"), calibration, w_bits=4, a_bits=4, target="tensorrt")
    with pytest.warns(ep.EdgeportWarning, match="W4A4 for TensorRT: TensorRT runs INT8 activations"):
        artifact = ep.export(quantized, calibration[:1], targets=["tensorrt"], out=tmp_path)["tensorrt"]
    assert artifact.settings["tensorrt"]["readiness"]["ready"] and artifact.settings["tensorrt"]["precision"] == "int8"
    assert any("INT8 speed at best" in note for note in artifact.notes)


def quantize_without_zero_point(path, output_dtype=None, weight_type=None):
    """x[4] -> QuantizeLinear (no zero point) -> DequantizeLinear -> y; with `weight_type`, y is
    also multiplied by a weight dequantized from that type without a zero point."""
    attributes = {"output_dtype": output_dtype} if output_dtype is not None else {}
    nodes = [helper.make_node("QuantizeLinear", ["x", "scale"], ["xq"], name="q_x", **attributes),
             helper.make_node("DequantizeLinear", ["xq", "scale"], ["xd"], name="dq_x")]
    inits = [numpy_helper.from_array(np.float32(0.1), "scale")]
    output = "xd"
    if weight_type is not None:
        inits.append(numpy_helper.from_array(np.arange(4).astype(weight_type), "w"))
        nodes += [helper.make_node("DequantizeLinear", ["w", "scale"], ["wd"], name="dq_w"),
                  helper.make_node("Mul", ["xd", "wd"], ["y"], name="mul")]
        output = "y"
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4])],
                              [helper.make_tensor_value_info(output, TensorProto.FLOAT, [4])], inits)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)]), str(path))
    return path


def test_a_quantize_without_zero_point_is_uint8_and_not_ready(tmp_path):
    """ONNX's QuantizeLinear without a zero point writes UINT8: ONNX Runtime, which verifies the
    file, clamps negatives to 0, where TensorRT's INT8 keeps them. The file is not ready; with
    output_dtype INT8 it is; a weight stored as uint8 without a zero point is not either."""
    import onnxruntime as ort

    implicit = quantize_without_zero_point(tmp_path / "implicit.onnx")
    session = ort.InferenceSession(str(implicit), providers=["CPUExecutionProvider"])
    assert session.run(None, {"x": np.float32([-1, -0.5, 0.5, 1])})[0].tolist() == pytest.approx([0, 0, 0.5, 1])
    readiness = check_readiness(implicit)
    assert not readiness.ready and any(v.rule == "int8" and "UINT8" in v.message and v.node == "QuantizeLinear q_x"
                                       for v in readiness.violations), readiness.summary()
    signed = check_readiness(quantize_without_zero_point(tmp_path / "signed.onnx", output_dtype=TensorProto.INT8))
    assert signed.ready and signed.quantized, signed.summary()
    weights = check_readiness(quantize_without_zero_point(tmp_path / "u8w.onnx", TensorProto.INT8, np.uint8))
    assert [v.node for v in weights.violations] == ["DequantizeLinear dq_w"], weights.summary()
    int4_activation = check_readiness(quantize_without_zero_point(tmp_path / "int4.onnx", TensorProto.INT4))
    assert {v.rule for v in int4_activation.violations} == {"int4-weights-only"}, int4_activation.summary()


def test_trtexec_shapes_match_the_inputs_names_and_ranks():
    """trtexec splits a shape flag at commas and each entry at its last colon, and drops single
    quotes from names: a name with a colon is written as it is; one with a comma or a quote, or
    a profile whose rank differs from the ONNX input's, is one clear error, not a script that
    builds a different profile."""
    readiness = Readiness("m.onnx", dynamic_inputs={"input:0": ["batch", 3]})
    command = trtexec_command(Path("m.onnx"), readiness, shapes={"input:0": ([1, 3], [2, 3], [8, 3])})
    assert "--minShapes=input:0:1x3" in command and "--maxShapes=input:0:8x3" in command
    for name in ("a,b", "it's"):
        with pytest.raises(ep.UserError, match="trtexec cannot take shapes"):
            trtexec_command(Path("m.onnx"), Readiness("m.onnx", dynamic_inputs={name: ["batch"]}),
                            shapes={name: ([1], [2], [8])})
    with pytest.raises(ep.UserError, match="has rank 2"):
        trtexec_command(Path("m.onnx"), readiness, shapes={"input:0": ([1, 3, 1], [2, 3, 1], [8, 3, 1])})


def test_the_script_passes_odd_model_names_to_trtexec_unchanged(tmp_path):
    """A model name with spaces, quotes and shell syntax reaches trtexec as one argument each,
    run by the real shell; nothing in it is executed. The trtexec on PATH here only prints its
    arguments (TensorRT cannot be installed on this machine)."""
    name = "my model $(touch injected) 'q\" ;x`touch injected2`"
    ep.export("cnn-digits", targets=["tensorrt"], out=tmp_path, name=name, dynamic_batch=True)
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "trtexec").write_text('#!/bin/sh\nfor arg in "$@"; do printf "%s\\n" "$arg"; done\n')
    (bin_dir / "trtexec").chmod(0o755)
    run = subprocess.run([str(tmp_path / f"{name}-tensorrt.trtexec.sh")], capture_output=True, text=True, cwd="/",
                         env={**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}"}, check=True)
    arguments = run.stdout.splitlines()
    assert arguments[:2] == [f"--onnx={name}-tensorrt.onnx", f"--saveEngine={name}-tensorrt.engine"]
    assert arguments[-1] == "--maxShapes=x:8x1x8x8"
    assert not list(tmp_path.glob("injected*")) and not list(Path("/").glob("injected*"))
