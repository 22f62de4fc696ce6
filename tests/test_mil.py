"""The MIL interpreter: Core ML packages checked numerically without Core ML.

Real coremltools conversions of real models, saved and reloaded; faults are planted by
editing the saved package itself (its weight file, its program's constants) and the check
must fail and name the edited op.
"""
import json
import platform
import shutil
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import edgeport as ep
from edgeport.export.mil import OPS, MILInterpreterRunner, MILProgram
from hf_models import ARCHITECTURES

PROGRAM = Path("Data/com.apple.CoreML/model.mlmodel")
WEIGHTS = Path("Data/com.apple.CoreML/weights/weight.bin")


@pytest.fixture(scope="module")
def vit_package(tmp_path_factory) -> Path:
    """vit-digits as an fp32 Core ML package (with its sidecar), exported once."""
    folder = tmp_path_factory.mktemp("vit")
    return ep.export("vit-digits", targets=["coreml"], out=folder)["coreml"].path


def fresh_copy(package: Path, folder: Path) -> Path:
    """A copy of an exported package and its sidecar to plant a fault in."""
    target = folder / package.name
    shutil.copytree(package, target)
    shutil.copy(package.with_name(package.name + ".edgeport.json"), folder)
    return target


def load_program_spec(package: Path):
    from coremltools.proto import Model_pb2

    spec = Model_pb2.Model()
    spec.ParseFromString((package / PROGRAM).read_bytes())
    return spec


def main_block(spec):
    function = spec.mlProgram.functions["main"]
    return function.block_specializations[function.opset]


def op_producing(block, var: str):
    return next(op for op in block.operations if any(o.name == var for o in op.outputs))


def input_const(block, op, parameter: str):
    """The const op that feeds `parameter` of `op`."""
    return op_producing(block, op.inputs[parameter].arguments[0].name)


def swap_weight_rows(package: Path, op_output: str, rows=(0, 1)) -> None:
    """Swap two rows of the weight of the op producing `op_output`, in the package's weight
    file (its blob header: sentinel 0xDEADBEEF, dtype, size in bytes, data offset)."""
    spec = load_program_spec(package)
    block = main_block(spec)
    const = input_const(block, op_producing(block, op_output), "weight")
    shape = [d.constant.size for d in const.outputs[0].type.tensorType.dimensions]
    offset = const.attributes["val"].blobFileValue.offset
    with open(package / WEIGHTS, "r+b") as blob:
        blob.seek(offset)
        sentinel, _, size, data = struct.unpack("<IIQQ", blob.read(24))
        assert sentinel == 0xDEADBEEF
        blob.seek(data)
        weight = np.frombuffer(blob.read(size), dtype=np.float32).reshape(shape).copy()
        weight[list(rows)] = weight[list(reversed(rows))]
        blob.seek(data)
        blob.write(weight.tobytes())


def edit_const(package: Path, op_output: str, parameter: str, edit) -> None:
    """Apply `edit` to the immediate value feeding `parameter` of the op producing `op_output`."""
    spec = load_program_spec(package)
    block = main_block(spec)
    tensor = input_const(block, op_producing(block, op_output), parameter).attributes["val"].immediateValue.tensor
    edit(tensor)
    (package / PROGRAM).write_bytes(spec.SerializeToString())


def first_departure(package: Path, model, inputs=None):
    report = ep.verify(package, model, inputs, localize=True)
    assert not report.passed, report.summary()
    return report.localization[0].first


def test_a_package_is_verified_numerically_by_the_interpreter(vit_package):
    artifact = ep.Artifact.load(vit_package)
    assert artifact.parity.passed and artifact.parity.candidate == "mil-interpreter (fp32)"
    assert artifact.parity.outputs[0].max_rel_error < 1e-5
    assert "numerical" not in artifact.settings["verification"]  # nothing "not checked"


def test_swapped_weight_rows_are_caught_and_localized(vit_package, tmp_path):
    package = fresh_copy(vit_package, tmp_path)
    swap_weight_rows(package, "linear_6")  # blocks.1.mlp.0
    first = first_departure(package, "vit-digits")
    assert (first.module, first.name, first.candidate_op) == ("blocks.1.mlp.0", "linear_6", "linear")


def test_a_changed_epsilon_is_caught_and_localized(vit_package, tmp_path):
    package = fresh_copy(vit_package, tmp_path)
    edit_const(package, "layer_norm_3", "epsilon", lambda tensor: tensor.floats.values.__setitem__(0, 0.5))
    first = first_departure(package, "vit-digits")
    assert (first.module, first.name, first.candidate_op) == ("blocks.1.norm2", "layer_norm_3", "layer_norm")


def test_a_flipped_transpose_is_caught_and_localized(tmp_path):
    """BERT's value heads [2, 16, 2, 16] -> [0, 2, 1, 3]: [0, 2, 3, 1] gives the same shape
    (sequence and head size are both 16), so only the numbers can tell."""
    model, example = ARCHITECTURES["bert"]()
    package = ep.export(model, example, targets=["coreml"], out=tmp_path / "good")["coreml"].path
    package = fresh_copy(package, tmp_path)
    edit_const(package, "transpose_2", "perm", lambda tensor: tensor.ints.values.__setitem__(slice(None), [0, 2, 3, 1]))
    first = first_departure(package, model, [example])
    assert (first.name, first.candidate_op, first.op) == ("transpose_2", "transpose", "aten.transpose.int")
    assert first.module.endswith("attention.self")


class Warp(nn.Module):
    """grid_sample, which Core ML runs as its `resample` op."""

    def forward(self, x):
        return nn.functional.grid_sample(x, x[:, :2].permute(0, 2, 3, 1).tanh(), align_corners=False)


def test_an_op_the_interpreter_lacks_is_named_and_the_check_says_not_checked(tmp_path):
    artifact = ep.export(Warp(), torch.randn(1, 3, 8, 8), targets=["coreml"], out=tmp_path)["coreml"]
    assert artifact.parity is None and "resample" not in OPS
    assert artifact.settings["verification"]["numerical"] == \
        "not checked here: the MIL interpreter has no implementation of op resample"
    assert any("NOT checked" in note and "op resample" in note for note in artifact.notes)


def test_fp16_programs_run_in_fp16(tmp_path):
    artifact = ep.export("cnn-digits", targets=["coreml"], out=tmp_path, coreml_precision="fp16")["coreml"]
    assert artifact.parity.passed and artifact.parity.candidate == "mil-interpreter (fp16)"
    program = MILProgram(artifact.path)
    assert program.precision == "fp16"
    image = ep.zoo.testset("cnn-digits")[0][:1].numpy()
    _, trace = program.run({"x": image}, trace=True)
    computed = [o.value.dtype for o in trace if o.op_type in ("conv", "linear", "relu")]
    assert computed and all(dtype == np.float16 for dtype in computed)
    # rounding every op's result to fp16 shows: the error is fp16-sized, not fp32-sized
    assert 1e-5 < artifact.parity.outputs[0].max_rel_error < 1e-2


@pytest.mark.parametrize("mode", ["int8", "int4", "palettize4", "palettize6"])
def test_compressed_weights_are_decompressed_and_verified(mode, tmp_path):
    artifact = ep.export("vit-digits", targets=["coreml"], out=tmp_path, coreml_weights=mode)["coreml"]
    assert artifact.parity.passed and artifact.parity.candidate == "mil-interpreter (fp32)"
    assert artifact.parity.outputs[0].tolerance.kind == "cosine"


@pytest.mark.parametrize("bits", [8, 4])
def test_quantized_zoo_models_verify_with_quantize_and_dequantize(bits, tmp_path):
    qmodel = ep.quantize("cnn-digits", w_bits=bits, a_bits=bits)
    artifact = ep.export(qmodel, ep.zoo.example("cnn-digits"), targets=["coreml"], out=tmp_path)["coreml"]
    histogram = artifact.settings["verification"]["structure"]["op_histogram"]
    assert histogram["quantize"] > 0 and histogram["dequantize"] > 0
    assert artifact.parity.passed and artifact.parity.candidate == "mil-interpreter (fp32)"


@pytest.mark.parametrize("form", ["unrolled", "step"])
def test_spiking_forms_verify(form, tmp_path):
    artifact = ep.export("snn-digits", targets=["coreml"], out=tmp_path, snn_form=form)["coreml"]
    assert artifact.parity.passed and artifact.parity.candidate == "mil-interpreter (fp32)"  # the precision it ran


class Apply(nn.Module):
    def __init__(self, function):
        super().__init__()
        self.function = function

    def forward(self, x):
        return self.function(x)


def assigned(x: torch.Tensor, where, value) -> torch.Tensor:
    """A copy of x with `value` written at `where` (what torch.export turns into a scatter)."""
    y = x.clone()
    y[where] = value
    return y


SCATTER_INDEX = torch.tensor([[3, 0, 1, 4, 2], [1, 1, 0, 2, 4]])  # repeats: add accumulates them
F = nn.functional
LAYERS = {  # layers users bring, beyond the zoo: each MIL op's semantics (pads, ceil mode, modes) checked
    "conv_transpose+crop": (nn.ConvTranspose2d(3, 4, 3, stride=2, padding=1, output_padding=1), (1, 3, 6, 6)),
    "avg_pool ceil, padding excluded": (nn.AvgPool2d(3, 2, 1, ceil_mode=True, count_include_pad=False), (1, 3, 9, 9)),
    "avg_pool padding included": (nn.AvgPool2d(3, stride=2, padding=1), (1, 3, 9, 9)),
    "max_pool ceil, padded": (nn.MaxPool2d(3, stride=2, padding=1, ceil_mode=True), (1, 3, 10, 10)),
    "adaptive avg_pool": (nn.AdaptiveAvgPool2d((2, 3)), (1, 2, 6, 9)),
    "upsample nearest": (nn.Upsample(scale_factor=2, mode="nearest"), (1, 3, 5, 5)),
    "upsample bilinear": (nn.Upsample(scale_factor=2, mode="bilinear"), (1, 3, 5, 5)),
    "upsample bilinear, corners aligned": (nn.Upsample(scale_factor=2, mode="bilinear", align_corners=True),
                                           (1, 3, 5, 5)),
    "conv1d same": (nn.Conv1d(2, 3, 4, padding="same"), (1, 2, 9)),
    "depthwise dilated conv": (nn.Conv2d(4, 4, 3, padding=2, dilation=2, groups=4), (1, 4, 7, 7)),
    "instance_norm": (nn.InstanceNorm2d(3, affine=True), (2, 3, 5, 5)),
    "group norm": (nn.GroupNorm(1, 4), (2, 4, 5, 5)),
    "batch_norm": (nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6)), (3, 4)),
    "activations": (Apply(lambda x: F.leaky_relu(x, 0.1) + F.elu(x) + F.hardsigmoid(x) + F.softplus(x)
                          + F.hardswish(x) + F.relu6(x) + torch.erf(x) + x.abs().sqrt() + x.clamp(-0.5, 0.5)), (2, 8)),
    "reductions": (Apply(lambda x: x.sum(1) + x.amax(1) + x.amin(1) + x.norm(dim=1) + x.logsumexp(1)), (2, 5)),
    "argmax": (Apply(lambda x: x.argmax(1)), (2, 5)),
    "topk": (Apply(lambda x: torch.topk(x, 2, dim=1).values), (2, 5)),
    "cumsum": (Apply(lambda x: x.cumsum(1)), (2, 5)),
    "pad reflect": (Apply(lambda x: F.pad(x, (1, 2, 2, 1), mode="reflect")), (1, 2, 5, 5)),
    "pad replicate": (Apply(lambda x: F.pad(x, (1, 2, 2, 1), mode="replicate")), (1, 2, 5, 5)),
    "pixel_shuffle": (nn.PixelShuffle(2), (1, 8, 3, 3)),
    "pixel_unshuffle (an iOS16 op: the deployment target rises to it)": (nn.PixelUnshuffle(2), (1, 2, 6, 4)),
    "negative indices": (Apply(lambda x: x[:, -1] + x[:, [0, -2]].sum(1)), (2, 5)),
    "tile": (Apply(lambda x: x.repeat(2, 3)), (2, 5)),
    "reverse": (Apply(lambda x: x.flip(1)), (2, 5)),
    "log_softmax": (nn.LogSoftmax(1), (2, 5)),
    "GRU": (nn.GRU(4, 4, batch_first=True), (1, 5, 4)),
    "LSTM": (nn.LSTM(4, 4, batch_first=True), (1, 5, 4)),
    "einsum": (Apply(lambda x: torch.einsum("bij,bkj->bik", x, x)), (2, 3, 4)),
    # writes into a tensor: MIL scatter ops (and non_zero), which the interpreter once lacked
    "scatter (scatter_along_axis, update)": (Apply(lambda x: x.scatter(1, SCATTER_INDEX, x * 2)), (2, 5)),
    "scatter_add (scatter_along_axis, add)": (Apply(lambda x: x.scatter_add(1, SCATTER_INDEX, x)), (2, 5)),
    "slice assignment (scatter)": (Apply(lambda x: assigned(x, (slice(None), slice(1, 3)), x[:, 3:5].exp())), (2, 5)),
    "masked assignment (non_zero, scatter_nd)": (Apply(lambda x: assigned(x, x > 0.5, 0.0)), (2, 5)),
}


@pytest.mark.parametrize("name", LAYERS)
def test_layers_beyond_the_zoo_verify(name, tmp_path):
    layer, shape = LAYERS[name]
    torch.manual_seed(0)
    artifact = ep.export(layer.eval(), torch.randn(*shape), targets=["coreml"], out=tmp_path)["coreml"]
    assert artifact.parity.passed and artifact.parity.candidate == "mil-interpreter (fp32)", artifact.parity.summary()


def test_a_scatter_at_a_dynamic_batch_is_verified_at_both_sizes(tmp_path):
    """GhostNet cuts its concatenated halves to the output width; with a dynamic batch coremltools
    writes that as a `scatter`, which the interpreter lacked: the package went unchecked."""
    model = Apply(lambda x: assigned(x, (slice(None), slice(1, 3)), x[:, 3:5].exp()))
    artifact = ep.export(model, torch.randn(2, 5), targets=["coreml"], out=tmp_path, dynamic_batch=True)["coreml"]
    assert artifact.settings["verification"]["structure"]["op_histogram"]["scatter"] >= 1
    assert artifact.parity.passed and "numerical" not in artifact.settings["verification"]
    assert artifact.settings["verification"]["flexible_shapes"]["checked"].endswith("passed")


def coremltools_value(op: str, **inputs) -> np.ndarray:
    """What coremltools' own definition of MIL op `op` computes on constant inputs (its value
    inference, as its const-folding passes use it)."""
    from coremltools.converters.mil import Builder as mb
    from coremltools.converters.mil.mil import Function
    from edgeport.export.mil import import_coremltools_quietly

    ct = import_coremltools_quietly()
    with Function({}, opset_version=ct.target.iOS15):
        result = getattr(mb, op)(**{k: v.copy() if isinstance(v, np.ndarray) else v for k, v in inputs.items()})
    return [r.val for r in result] if isinstance(result, (list, tuple)) else result.val


RNG = np.random.default_rng(0)
X = np.concatenate([[0.5, -0.5, 1.0, 0.0], RNG.standard_normal(116)]).astype(np.float32).reshape(2, 3, 4, 5)
DEFINITIONS = {  # op -> inputs: values on an edge of the definition (x == alpha, ties, negative strides)
    "thresholded_relu": dict(x=X, alpha=0.5), "elu": dict(x=X, alpha=0.7), "leaky_relu": dict(x=X, alpha=0.1),
    "sigmoid_hard": dict(x=X, alpha=0.3, beta=0.4), "scaled_tanh": dict(x=X, alpha=2.0, beta=0.5),
    "softplus_parametric": dict(x=X, alpha=np.array([1, 2, 3], np.float32), beta=np.array([.5, 1, 2], np.float32)),
    "prelu": dict(x=X, alpha=np.array([0.1, 0.2, 0.3], np.float32)),
    "gelu": dict(x=X, mode="TANH_APPROXIMATION"), "band_part": dict(x=X, lower=1, upper=0),
    "reduce_log_sum_exp": dict(x=X, axes=[1, 3], keep_dims=True), "topk": dict(x=X, k=2, axis=1),
    "argsort": dict(x=X, axis=1, ascending=True), "expand_dims": dict(x=X, axes=[1, -2]),
    "pad": dict(x=X, pad=np.array([1, 2, 0, 1], np.int32), mode="reflect"),
    "slice_by_index": dict(x=X, begin=np.array([0, 2, -1, 4], np.int32), end=np.array([2, 0, 0, 0], np.int32),
                           stride=np.array([1, -1, -2, -1], np.int32), end_mask=[False, True, False, True]),
    "scatter_along_axis": dict(data=X, indices=np.tile(np.array([1, 0, 3, 2, 1], np.int32), (2, 3, 2, 1)),
                               updates=RNG.standard_normal((2, 3, 2, 5)).astype(np.float32), axis=2, mode="update"),
}


@pytest.mark.parametrize("op", DEFINITIONS)
def test_ops_compute_what_coremltools_defines(op):
    """thresholded_relu keeps an x equal to alpha ("x if x >= alpha"); the interpreter zeroed it."""
    theirs, ours = coremltools_value(op, **DEFINITIONS[op]), OPS[op](**DEFINITIONS[op])
    for expected, got in zip(theirs if isinstance(theirs, list) else [theirs], ours if isinstance(ours, tuple)
                             else [ours]):
        assert np.asarray(got).shape == np.asarray(expected).shape
        assert np.allclose(got, expected, atol=1e-6), op


def test_every_op_of_the_packages_made_here_has_an_implementation(vit_package):
    assert MILProgram(vit_package).missing == []


def test_a_broken_package_is_refused_in_one_line(vit_package, tmp_path):
    package = fresh_copy(vit_package, tmp_path)
    (package / PROGRAM).write_bytes(b"not a program")
    with pytest.raises(ep.UserError, match="cannot load .* as an ML Program"):
        MILInterpreterRunner(package).load()


def test_integer_inputs_outside_int32_are_refused(tmp_path):
    model, example = ARCHITECTURES["distilbert"]()
    artifact = ep.export(model, example, targets=["coreml"], out=tmp_path)["coreml"]
    runner = MILInterpreterRunner(artifact.path).load()
    ids, mask = (a.numpy() for a in example)
    with pytest.raises(ep.UserError, match="outside int32"):
        runner.infer({"input_ids": ids + 2 ** 40, "attention_mask": mask})


@pytest.mark.needs_macos
@pytest.mark.skipif(platform.system() != "Darwin", reason="needs macOS: Core ML predicts only there")
@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_interpreter_matches_core_ml_itself(precision, tmp_path):
    from edgeport.export.coreml import CoreMLRunner

    artifact = ep.export("vit-digits", targets=["coreml"], out=tmp_path, coreml_precision=precision)["coreml"]
    images = ep.zoo.testset("vit-digits")[0][:16].numpy()
    interpreter, core_ml = MILInterpreterRunner(artifact.path).load(), CoreMLRunner(artifact.path).load()
    for image in images:
        ours, theirs = interpreter.infer({"x": image[None]}), core_ml.infer({"x": image[None]})
        for name in ours:
            scale = np.abs(theirs[name]).max()
            assert np.abs(ours[name] - theirs[name]).max() <= (1e-4 if precision == "fp32" else 1e-2) * scale


# --- localization beyond Core ML: ONNX files and quantized models ------------------------------


def swap_onnx_weight_rows(path: Path, module: str) -> None:
    """Swap two rows of the weight the MatMul of `module` multiplies by, in the ONNX file."""
    import onnx
    from onnx import numpy_helper

    proto = onnx.load(str(path))
    scope = f"'{module}'"
    node = next(n for n in proto.graph.node if n.op_type == "MatMul" and any(
        p.key == "pkg.torch.onnx.name_scopes" and scope in p.value for p in n.metadata_props))
    initializer = next(i for i in proto.graph.initializer if i.name == node.input[1])
    weight = numpy_helper.to_array(initializer).copy()
    weight[[0, 1]] = weight[[1, 0]]
    initializer.CopyFrom(numpy_helper.from_array(weight, initializer.name))
    onnx.save(proto, str(path))


def test_cli_localize_names_the_first_departing_module_of_an_onnx_file(tmp_path, capsys):
    from edgeport.cli import main

    artifact = ep.export("vit-digits", out=tmp_path)["onnx"]
    swap_onnx_weight_rows(artifact.path, "blocks.2.mlp.2")
    capsys.readouterr()
    assert main(["verify", str(artifact.path), "--against", "vit-digits", "--localize", "--json"]) == 1
    printed = capsys.readouterr()
    report = json.loads(printed.out)
    assert "LeafSpec" not in printed.err  # torch's internal deprecation is not the user's to see
    first = report["localization"][0]["first"]
    assert not report["passed"] and first["module"] == "blocks.2.mlp.2" and first["op"] == "aten.linear.default"
    assert main(["verify", str(artifact.path), "--against", "vit-digits", "--localize"]) == 1
    printed = capsys.readouterr().out
    assert "first departure at blocks.2.mlp.2" in printed and "DEPARTS" in printed


def test_localize_names_the_layer_a_broken_quantizer_ruins(tmp_path):
    """A quantized model whose blocks.1.attn.proj weights are quantized with a scale 50x too
    large (nearly every weight rounds to zero): the artifact is faithful to it, and the
    fake-quant-against-float table names that layer as the first to depart."""
    qmodel = ep.quantize("vit-digits")
    qmodel.get_submodule("blocks.1.attn.proj").wq.scale *= 50
    artifact = ep.export(qmodel, ep.zoo.example("vit-digits"), out=tmp_path)["onnx"]
    report = ep.verify(artifact, qmodel, [(image,) for image in ep.zoo.testset("vit-digits")[0][:8].split(1)],
                       localize=True)
    assert report.passed  # the ONNX file computes what the (broken) model computes
    faithful, quantization = report.localization
    assert faithful.first is None
    assert quantization.first.module == "blocks.1.attn.proj" and quantization.first.op == "QuantLinear"
    assert all(row.parity.passed for row in quantization.rows[:quantization.rows.index(quantization.first)])
