"""The shared ONNX graph helpers, and the per-op rule tables that replaced if-chains in the
TensorRT readiness check and in slimming: each table covers what its chain covered."""
import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper
from torch import fx, nn
from torch.fx.passes.shape_prop import ShapeProp

import edgeport as ep
from edgeport.export.onnxgraph import (Constants, attribute_value, consumers, drop_unused, keep_residual_norms_apart,
                                   producers, redirect_inputs)
from edgeport.export.tensorrt import NODE_CHECKS, WEIGHT_OUTPUT_AXIS, check_readiness
from edgeport.quant.qdq import integer_matmuls
from edgeport.transforms import slim


def graph_of(nodes, initializers=(), inputs=("x",), outputs=("y",)) -> onnx.GraphProto:
    return helper.make_graph(nodes, "g", [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in inputs],
                             [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in outputs],
                             list(initializers))


@pytest.fixture
def decoded(monkeypatch) -> list[str]:
    """The names of the tensors numpy_helper.to_array decodes during the test."""
    names, to_array = [], numpy_helper.to_array

    def counting(tensor, *args, **kwargs):
        names.append(tensor.name)
        return to_array(tensor, *args, **kwargs)
    monkeypatch.setattr(numpy_helper, "to_array", counting)
    return names


def test_constants_index_initializers_and_every_constant_form_and_decodes_on_demand(decoded):
    weight = numpy_helper.from_array(np.ones((4, 3), np.float32), "w")
    graph = graph_of([helper.make_node("Constant", [], ["c"], value=numpy_helper.from_array(np.int8([1, 2]))),
                      helper.make_node("Constant", [], ["f"], value_float=0.5),
                      helper.make_node("Constant", [], ["i"], value_ints=[3, 4]),
                      helper.make_node("Constant", [], ["s"], value_string="not a number"),
                      helper.make_node("Constant", [], ["w"], value=numpy_helper.from_array(np.zeros(2, np.float32)))],
                     [weight, numpy_helper.from_array(np.float32(2), "b")])
    constants = Constants(graph)
    assert all(name in constants for name in ("w", "b", "c", "f", "i")) and "s" not in constants and "x" not in constants
    assert constants.shape("b") == () and decoded == []  # indexing and shapes decode nothing
    assert constants["f"].dtype == np.float32 and float(constants["f"]) == 0.5
    assert constants["i"].tolist() == [3, 4] and constants["c"].dtype == np.int8
    assert constants["w"].tolist() == [0, 0]  # a Constant output wins over an initializer of its name
    constants["b"], constants["b"]
    assert decoded.count("b") == 1  # decoded once, then kept


def test_consumer_and_producer_maps():
    graph = graph_of([helper.make_node("Relu", ["x"], ["r"], name="relu"),
                      helper.make_node("Add", ["r", "r"], ["a"], name="add"),
                      helper.make_node("Mul", ["r", "x"], ["y"], name="mul")])
    readers = consumers(graph)
    assert [n.name for n in readers["r"]] == ["add", "add", "mul"] and [n.name for n in readers["x"]] == ["relu", "mul"]
    assert "y" not in readers
    writers = producers(graph)
    assert {name: node.name for name, node in writers.items()} == {"r": "relu", "a": "add", "y": "mul"}


def test_attribute_value_and_default():
    node = helper.make_node("Transpose", ["x"], ["y"], perm=[1, 0], axis=-1)
    assert attribute_value(node, "perm") == [1, 0] and attribute_value(node, "axis", 1) == -1
    assert attribute_value(node, "transB", 0) == 0 and attribute_value(node, "missing") is None


def test_redirect_inputs_and_drop_unused():
    nodes = [helper.make_node("Relu", ["x"], ["old"]), helper.make_node("Neg", ["x"], ["new"]),
             helper.make_node("Add", ["old", "old"], ["y"]), helper.make_node("Abs", ["w"], ["dead"])]
    graph = graph_of(nodes, [numpy_helper.from_array(np.float32(1), "w"), numpy_helper.from_array(np.float32(1), "k")])
    graph.value_info.append(helper.make_tensor_value_info("old", TensorProto.FLOAT, [1]))
    redirect_inputs(graph.node, "old", "new")
    assert list(graph.node[2].input) == ["new", "new"]
    drop_unused(graph)
    assert [n.op_type for n in graph.node] == ["Neg", "Add"] and not graph.initializer and not graph.value_info


def test_weight_output_axis_table_covers_the_former_chain():
    """Conv: axis 0, ConvTranspose: 1, MatMul: the last, Gemm: 0 with transB else 1; any other
    consumer does not read a weight."""
    assert set(WEIGHT_OUTPUT_AXIS) == {"Conv", "ConvTranspose", "MatMul", "Gemm"}
    axis = {op: WEIGHT_OUTPUT_AXIS[op](helper.make_node(op, ["a", "b"], ["y"]), 3) for op in WEIGHT_OUTPUT_AXIS}
    assert axis == {"Conv": 0, "ConvTranspose": 1, "MatMul": 2, "Gemm": 1}
    assert WEIGHT_OUTPUT_AXIS["Gemm"](helper.make_node("Gemm", ["a", "b"], ["y"], transB=1), 2) == 0


def test_node_checks_cover_quantize_and_dequantize():
    assert set(NODE_CHECKS) == {"QuantizeLinear", "DequantizeLinear"}


def weight_dq_model(path, axis: int, scale_as_constant_node: bool = False, **gemm_attributes):
    """x -> Gemm(x, DQ(int8 W[8, 4], per-channel scales on `axis`)) -> y."""
    weight = numpy_helper.from_array(np.ones((8, 4), np.int8), "w")
    scale = np.full(weight.dims[axis], 0.1, np.float32)
    nodes = [helper.make_node("DequantizeLinear", ["w", "s", "z"], ["wd"], name="dq", axis=axis),
             helper.make_node("Gemm", ["x", "wd"], ["y"], name="use", **gemm_attributes)]
    initializers = [weight, numpy_helper.from_array(np.zeros_like(scale, np.int8), "z")]
    if scale_as_constant_node:
        nodes.insert(0, helper.make_node("Constant", [], ["s"], value_floats=scale.tolist()))
    else:
        initializers.append(numpy_helper.from_array(scale, "s"))
    onnx.save(helper.make_model(graph_of(nodes, initializers), opset_imports=[helper.make_opsetid("", 18)]), str(path))
    return path


@pytest.mark.parametrize("axis, attributes, ready", [(1, {}, True), (0, {}, False), (0, {"transB": 1}, True)])
def test_readiness_reads_the_weight_axis_from_the_table_without_decoding_the_weight(tmp_path, decoded, axis,
                                                                                   attributes, ready):
    readiness = check_readiness(weight_dq_model(tmp_path / "m.onnx", axis, **attributes))
    assert readiness.ready == ready and readiness.quantized, readiness.summary()
    assert "w" not in decoded


def test_readiness_takes_a_scale_from_any_constant_form(tmp_path):
    """A Constant with value_floats is a constant scale (the former index failed to decode it)."""
    readiness = check_readiness(weight_dq_model(tmp_path / "m.onnx", 1, scale_as_constant_node=True))
    assert readiness.ready, readiness.summary()


def test_integer_matmul_rewrite_decodes_scales_not_weights(decoded):
    """MatMul(DQ(x), DQ(W)) + bias: the rewrite reads the scales; W's shape comes from its dims."""
    q = [numpy_helper.from_array(np.float32(0.1), "xs"), numpy_helper.from_array(np.int8(0), "xz"),
         numpy_helper.from_array(np.ones((4, 3), np.int8), "w"), numpy_helper.from_array(np.float32(0.2), "ws"),
         numpy_helper.from_array(np.int8(0), "wz"), numpy_helper.from_array(np.ones(3, np.float32), "bias")]
    nodes = [helper.make_node("QuantizeLinear", ["x", "xs", "xz"], ["xq"]),
             helper.make_node("DequantizeLinear", ["xq", "xs", "xz"], ["xd"]),
             helper.make_node("DequantizeLinear", ["w", "ws", "wz"], ["wd"]),
             helper.make_node("MatMul", ["xd", "wd"], ["m"]), helper.make_node("Add", ["m", "bias"], ["y"])]
    model = helper.make_model(graph_of(nodes, q), opset_imports=[helper.make_opsetid("", 18)])
    assert integer_matmuls(model) == 1
    assert "MatMulInteger" in {n.op_type for n in model.graph.node} and "w" not in decoded


def test_by_type_follows_the_class_hierarchy():
    class WideConv(nn.Conv2d):
        pass
    assert slim._by_type(slim.MODULE_RULES, WideConv(2, 2, 1)) is slim._conv
    assert slim._by_type(slim.MODULE_RULES, nn.LayerNorm(2)) is None and slim._by_type(slim.MODULE_RULES, None) is None


def test_slim_rule_tables_cover_the_former_chains():
    assert set(slim.MODULE_RULES) == {nn.Conv2d, nn.Linear, nn.BatchNorm2d, nn.BatchNorm1d, nn.AvgPool2d, nn.Flatten,
                                      *slim.ACTIVATIONS, *slim.POOLS}
    assert set(slim.FUNCTION_RULES) == {*slim.ACTIVATION_FUNCTIONS, *slim.ADDITIONS, torch.cat, torch.flatten}
    assert set(slim.METHOD_RULES) == {"relu", "sigmoid", "tanh", "flatten", "view", "reshape"}
    assert set(slim.CONSTANT_FOLDS) == set(slim.INPUT_CUTS) == {nn.Conv2d, nn.Linear}
    assert set(slim.OUTPUT_CUTS) == {nn.Conv2d, nn.Linear, nn.BatchNorm2d, nn.BatchNorm1d}
    assert [kind for kind, cut in slim.OUTPUT_CUTS.items() if cut.counted] == [nn.Conv2d, nn.Linear]
    assert slim._foldable(nn.Linear(2, 2)) and slim._foldable(nn.Conv2d(4, 4, 1))
    assert not slim._foldable(nn.Conv2d(4, 4, 1, groups=2)) and not slim._foldable(nn.BatchNorm2d(2))


class EveryRule(nn.Module):
    """Channel 1 of `conv` is the constant 0.5; every later op is one rule of the tables."""

    def __init__(self, pool: nn.Module):
        super().__init__()
        self.conv, self.norm, self.act, self.pool, self.flat = nn.Conv2d(2, 4, 1), nn.BatchNorm2d(4), nn.ReLU(), pool, \
            nn.Flatten()
        with torch.no_grad():
            self.conv.weight[1] = 0
            self.conv.bias[1] = 0.5

    def forward(self, x):
        y = torch.relu(self.act(self.norm(self.conv(x)))).sigmoid()
        y = self.pool(y)
        y = torch.cat([y, y], 1) + torch.cat([y, y], 1)
        return self.flat(y), torch.flatten(y, 1), y.view(y.shape[0], -1), y.reshape(y.shape[0], -1)


def analysis_of(model: nn.Module) -> dict[str, dict[int, float]]:
    gm = fx.symbolic_trace(model.eval())
    ShapeProp(gm).propagate(torch.randn(1, 2, 3, 3))
    return {node.name: info.const for node, info in slim._Analysis(gm).info.items()}


def test_each_rule_carries_the_constant_channel():
    const = analysis_of(EveryRule(nn.AvgPool2d(1)))
    assert const["conv"] == {1: 0.5}
    norm = EveryRule(nn.AvgPool2d(1)).norm.eval()
    with torch.no_grad():
        expected = float(torch.sigmoid(torch.relu(norm(torch.full((1, 4, 1, 1), 0.5))[0, 1])))
    assert const["pool"] == pytest.approx({1: expected}) and const["cat"] == pytest.approx({1: expected, 5: expected})
    assert const["add"] == pytest.approx({1: 2 * expected, 5: 2 * expected})
    flattened = {j * 9 + p: 2 * expected for j in (1, 5) for p in range(9)}
    for name in ("flat", "flatten", "view", "reshape"):
        assert const[name] == pytest.approx(flattened), name


def test_avg_pool_counting_zero_padding_ends_the_constant():
    const = analysis_of(EveryRule(nn.AvgPool2d(3, stride=1, padding=1)))
    assert const["sigmoid"] and not const["pool"] and not const["flat"]
    assert analysis_of(EveryRule(nn.AvgPool2d(3, stride=1, padding=1, count_include_pad=False)))["pool"]


def runtime_op_types(path) -> set[str]:
    """The op types of the graph ONNX Runtime runs for `path` after all its optimizations."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.optimized_model_filepath = str(path) + ".optimized.onnx"
    options.log_severity_level = 3
    ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return {node.op_type for node in onnx.load(options.optimized_model_filepath).graph.node}


def test_bert_residual_norms_stay_out_of_skip_layer_normalization(tmp_path):
    """BERT's post-norm residual Adds: as torch.onnx.export writes them ONNX Runtime fuses them
    into SkipLayerNormalization (slow on CPU); edgeport's ONNX form keeps them apart, the same
    numbers (the export verifies against torch)."""
    from edgeport.export.onnx import export_onnx
    from hf_models import ARCHITECTURES

    model, inputs = ARCHITECTURES["bert"]()
    plain = export_onnx(model, inputs, tmp_path, "plain", onnxruntime_form=False)
    assert "SkipLayerNormalization" in runtime_op_types(plain.path)
    artifact = ep.export(model, inputs, out=tmp_path, name="bert")["onnx"]
    assert artifact.parity.passed
    ops = runtime_op_types(artifact.path)
    assert "SkipLayerNormalization" not in ops and "LayerNormalization" in ops
    assert sum(n.op_type == "Sum" for n in onnx.load(str(artifact.path)).graph.node) == 2 * 2  # 2 layers, 2 each


def test_only_a_residual_add_read_by_a_layer_norm_alone_becomes_sum():
    scale = [numpy_helper.from_array(np.ones(4, np.float32), "g"), numpy_helper.from_array(np.ones(4, np.float32), "b")]
    nodes = [helper.make_node("Add", ["x", "r"], ["s"]),  # residual read by the norm alone: rewritten
             helper.make_node("LayerNormalization", ["s", "g"], ["n"]),
             helper.make_node("Add", ["n", "b"], ["t"]),  # a constant operand (a bias): kept
             helper.make_node("LayerNormalization", ["t", "g"], ["u"]),
             helper.make_node("Add", ["u", "r"], ["v"]),  # read by the norm and by the output: kept
             helper.make_node("LayerNormalization", ["v", "g"], ["y"])]
    graph = graph_of(nodes, scale, inputs=("x", "r"), outputs=("y", "v"))
    assert keep_residual_norms_apart(graph) == 1
    assert [n.op_type for n in graph.node if n.op_type in ("Add", "Sum")] == ["Sum", "Add", "Add"]
