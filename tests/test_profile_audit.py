"""The op profile and the profile's record on models users bring: quantized exports, files
written by other tools, eager torch modules; real ONNX Runtime and torch throughout."""
import copy
import io
import os
import tempfile
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

import edgeport as ep
from edgeport.runtime.opprofile import UNMAPPED, _read_trace, profile_onnxruntime, profile_torch, torch_category
from edgeport.runtime.profile import physical_cores


def small_graph(path: Path, names: bool, quantized_weight: bool = False) -> Path:
    """x[1,4] -> MatMul with a weight named `lin.weight` -> MatMul with its own transpose (an
    activation-by-activation product), as a tool other than edgeport writes it: no module
    metadata; nodes named or not; the weight plain or through a DequantizeLinear."""
    weight = np.arange(16, dtype=np.float32).reshape(4, 4) / 16
    if quantized_weight:
        initializers = [numpy_helper.from_array(np.round(weight * 100).astype(np.int8), "lin.weight_quantized"),
                        numpy_helper.from_array(np.array(0.01, np.float32), "lin.weight_scale")]
        weight_nodes = [helper.make_node("DequantizeLinear", ["lin.weight_quantized", "lin.weight_scale"], ["w"],
                                         name="dq" if names else "")]
    else:
        initializers, weight_nodes = [numpy_helper.from_array(weight, "lin.weight")], []
    w = "w" if quantized_weight else "lin.weight"
    nodes = [*weight_nodes, helper.make_node("MatMul", ["x", w], ["h"], name="linear" if names else ""),
             helper.make_node("Transpose", ["h"], ["ht"], name="transpose" if names else ""),
             helper.make_node("MatMul", ["ht", "h"], ["y"], name="scores" if names else "")]
    graph = helper.make_graph(nodes, "other-tool", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4, 4])], initializers)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    return path


FEEDS = [{"x": np.linspace(-1, 1, 4, dtype=np.float32).reshape(1, 4)}]


def test_torch_op_profile_leaves_the_model_as_it_found_it():
    model = ep.zoo.load("cnn-digits")
    feeds = [{"x": ep.zoo.testset("cnn-digits")[0][:1].numpy()}]
    profile_torch(model, ["x"], feeds, runs=3)
    # an open profiler range left on a submodule cannot be pickled: saving or copying the
    # model after profiling it failed
    assert not any("edgeport" in key for m in model.modules() for key in vars(m))
    torch.save(model, io.BytesIO())
    copy.deepcopy(model)


def test_torch_ops_are_categorized_by_family_not_by_one_spelling():
    assert [torch_category(op) for op in ("aten::_slow_conv2d_forward", "aten::thnn_conv2d", "aten::conv2d",
                                          "aten::mkldnn_convolution")] == ["conv"] * 4
    assert {torch_category(op) for op in ("aten::native_layer_norm", "aten::native_batch_norm",
                                          "aten::_native_batch_norm_legit_no_training")} == {"normalization"}
    assert torch_category("aten::max_pool2d_with_indices") == torch_category("aten::_unsafe_view") == "data movement"
    assert torch_category("aten::_softmax") == "attention" and torch_category("aten::addmm") == "matmul/gemm"
    assert torch_category("aten::gelu") == torch_category("aten::add") == "elementwise"
    model = ep.zoo.load("cnn-digits")
    ops = profile_torch(model, ["x"], [{"x": ep.zoo.testset("cnn-digits")[0][:1].numpy()}], runs=3).ops
    misplaced = [op.op_type for op in ops if op.category == "elementwise"
                 and any(stem in op.op_type for stem in ("conv", "norm", "pool"))]
    assert not misplaced and any(op.category == "conv" for op in ops)


def test_a_quantized_export_is_traced_to_its_modules_and_its_linears_are_matmuls(tmp_path):
    # the Q/DQ nodes edgeport emits have no names, and ORT's profiler names them from indices
    # the saved optimized graph does not keep: 45% of this model's time was untraced
    images = ep.zoo.testset("vit-digits")[0][:1]
    artifact = ep.export(ep.quantize("vit-digits", method="minmax"), example=images, out=tmp_path, name="vitq")["onnx"]
    name = artifact.inputs[0].name
    prof = profile_onnxruntime(artifact.path, [{name: images.numpy()}], runs=5)
    assert prof.module_coverage() >= 0.9
    linears = [op for op in prof.ops if op.op_type in ("QGemm", "Gemm")]
    # a Linear's weight reaches its Gemm through a DequantizeLinear: it is still a weight
    assert linears and all(op.category == "matmul/gemm" for op in linears)
    assert any(op.category == "attention" and op.op_type != "Softmax" for op in prof.ops)


def test_a_file_without_module_metadata_claims_no_module(tmp_path):
    path = small_graph(tmp_path / "named.onnx", names=True)
    prof = profile_onnxruntime(path, FEEDS, runs=5)
    by_type = {op.op_type: op for op in prof.ops}
    assert by_type["MatMul"].module == "lin"  # from its weight's name; the fused product is its neighbour
    assert by_type["MatMul"].category == "matmul/gemm" and by_type["FusedMatMul"].category == "attention"
    model = onnx.load(str(path))
    model.graph.initializer[0].name = "w"  # and now nothing in the file names a module
    model.graph.node[0].input[1] = "w"
    onnx.save(model, str(path))
    prof = profile_onnxruntime(path, FEEDS, runs=5)
    assert prof.module_coverage() == 0 and {op.module for op in prof.ops} == {UNMAPPED}


def test_unnamed_nodes_are_profiled_and_traced_without_touching_the_file(tmp_path):
    path = small_graph(tmp_path / "unnamed.onnx", names=False, quantized_weight=True)
    before = path.read_bytes()
    prof = profile_onnxruntime(path, FEEDS, runs=5)
    assert path.read_bytes() == before
    matmuls = sorted((op for op in prof.ops if "MatMul" in op.op_type), key=lambda op: op.category)
    assert [op.category for op in matmuls] == ["attention", "matmul/gemm"]  # ORT made them FusedMatMul, MatMulNBits
    assert all(op.module == "lin" for op in prof.ops)  # the weight names it through its DequantizeLinear


def test_onnxruntime_quantize_dynamic_output_maps_its_integer_convs(tmp_path):
    from onnxruntime.quantization import quantize_dynamic

    exported = ep.export("cnn-digits", out=tmp_path)["onnx"]
    dynamic = tmp_path / "cnn-dynamic.onnx"  # no sidecar: a file from another tool
    quantize_dynamic(str(exported.path), str(dynamic))
    prof = profile_onnxruntime(dynamic, [{"x": ep.zoo.testset("cnn-digits")[0][:1].numpy()}], runs=5)
    convs = [op for op in prof.ops if op.op_type == "ConvInteger"]
    assert convs and all(op.module.startswith("features.") and op.category == "conv" for op in convs)


def test_the_environment_names_the_threads_onnxruntime_ran_on(tmp_path):
    artifact = ep.export("cnn-digits", out=tmp_path)["onnx"]
    torch_threads = torch.get_num_threads()
    torch.set_num_threads(1)  # torch's setting says nothing of an ONNX Runtime session's
    try:
        prof = ep.profile(artifact.path, runs=10, warmup=2, sessions=1, ops=False, energy=False)
        pinned = ep.profile(artifact.path, runs=10, warmup=2, sessions=1, ops=False, energy=False, threads=1)
    finally:
        torch.set_num_threads(torch_threads)
    assert prof.environment["threads"] == physical_cores() and pinned.environment["threads"] == 1


def test_physical_cores_is_onnxruntimes_default_thread_count():
    import onnxruntime as ort

    before = len(os.listdir("/proc/self/task"))
    session = ort.InferenceSession(str(small_graph(Path(tempfile.mkdtemp()) / "m.onnx", names=True)),
                                   providers=["CPUExecutionProvider"])
    added = len(os.listdir("/proc/self/task")) - before
    del session
    assert added + 1 == physical_cores()  # the pool's workers and the calling thread


def test_a_missing_or_cut_off_trace_is_one_clear_error(tmp_path):
    empty, cut = tmp_path / "empty.json", tmp_path / "cut.json"
    empty.write_text("")
    cut.write_text('[{"cat": "Session", "name": "model_run", "ts": 1, "dur": 3},')
    for trace in ("", str(tmp_path / "absent.json"), str(empty), str(cut)):
        with pytest.raises(ep.UserError, match="no readable trace"):
            _read_trace(trace)


def test_the_op_profiler_leaves_nothing_behind(tmp_path, monkeypatch):
    work, temp = tmp_path / "work", tmp_path / "temp"
    work.mkdir()
    temp.mkdir()
    monkeypatch.chdir(work)
    monkeypatch.setattr(tempfile, "tempdir", str(temp))
    path = small_graph(tmp_path / "m.onnx", names=True)
    profile_onnxruntime(path, FEEDS, runs=3)
    with pytest.raises(Exception):  # a run that fails part way still ends the profiler
        profile_onnxruntime(path, [{"x": np.zeros((1, 5), np.float32)}], runs=3)
    assert list(work.iterdir()) == [] and list(temp.iterdir()) == []
