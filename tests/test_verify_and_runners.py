"""Comparator, runners and latency statistics on real runtimes."""
import numpy as np
import pytest
import torch

import onnx
from onnx import numpy_helper
from torch import nn

import edgeport as ep
from edgeport.core import TOLERANCES, draw_input, feeds_from, tolerance_for
from edgeport.verify import compare, judge
from edgeport.runtime.latency import measure, median_ci, summarize
from edgeport.core import TorchRunner
from edgeport.export.onnx import OnnxRuntimeRunner


@pytest.fixture(scope="module")
def cnn_artifact(tmp_path_factory):
    return ep.export("cnn-digits", out=tmp_path_factory.mktemp("cnn"))["onnx"]


def test_runners_share_one_interface(cnn_artifact):
    images = ep.zoo.testset("cnn-digits")[0][:1].numpy()
    ort_runner = OnnxRuntimeRunner(cnn_artifact.path, threads=1).load()
    torch_runner = TorchRunner(ep.zoo.load("cnn-digits"), ["x"], ort_runner.output_names).load()
    a, b = torch_runner.infer({"x": images}), ort_runner.infer({"x": images})
    assert list(a) == list(b) == ["output_0"] and a["output_0"].shape == b["output_0"].shape == (1, 10)


def test_comparator_catches_a_perturbed_model(cnn_artifact):
    model = ep.zoo.load("cnn-digits")
    with torch.no_grad():
        model.classifier.bias[3] += 0.05  # a 0.05 shift on one logit, about 0.4% of the output scale
    images = ep.zoo.testset("cnn-digits")[0][:8].numpy()
    report = compare(TorchRunner(model, ["x"]).load(), OnnxRuntimeRunner(cnn_artifact.path).load(),
                     [{"x": images[i:i + 1]} for i in range(8)])
    assert not report.passed and report.failures()[0].name == "output_0"
    assert report.outputs[0].max_abs_error == pytest.approx(0.05, rel=1e-3)
    assert "FAILED" in report.summary()


def test_nan_inputs_are_refused(cnn_artifact):
    images = ep.zoo.testset("cnn-digits")[0][:1].numpy().copy()
    images[0, 0, 1, 1] = np.inf
    runner = OnnxRuntimeRunner(cnn_artifact.path).load()
    with pytest.raises(ep.UserError, match="0 NaN and 1 Inf"):
        compare(runner, runner, [{"x": images}])


def test_tolerances_follow_dtype_and_precision():
    assert tolerance_for("fp32", np.dtype(np.bool_)).kind == "exact"
    assert tolerance_for("fp32", np.dtype(np.int64)).kind == "exact"
    assert tolerance_for("int8", np.dtype(np.float32)).kind == "cosine"
    assert tolerance_for("w4a4", np.dtype(np.float32)) is TOLERANCES["int4"]
    assert tolerance_for("fp16", np.dtype(np.float32)).max_error == 1e-2
    spikes = np.array([[0, 1, 1, 1]], dtype=np.bool_)
    assert not judge("s", spikes, spikes[:, ::-1].copy(), TOLERANCES["exact"]).passed
    reference = np.linspace(-1, 1, 1000).astype(np.float32)
    noisy = reference + np.random.default_rng(0).normal(0, 0.01, 1000).astype(np.float32)
    int8 = judge("y", reference, noisy, TOLERANCES["int8"])
    assert int8.passed and 30 < int8.sqnr_db < 40  # atol would have failed this int8-level noise
    assert not judge("y", reference, noisy, TOLERANCES["fp32"]).passed
    assert not judge("y", reference, np.full_like(reference, np.nan), TOLERANCES["int8"]).passed


def test_latency_statistics():
    samples = [float(x) for x in range(1, 101)]  # 1..100 ms
    stats = summarize(samples)
    assert stats.p50 == pytest.approx(50.5) and stats.p90 == pytest.approx(90.1)
    assert stats.mean == pytest.approx(50.5) and stats.throughput_per_s == pytest.approx(1000 / 50.5)
    low, high = median_ci(np.array(samples))
    assert low < stats.p50 < high and high - low < 25
    # two scattered sessions: Student's t at 1 degree of freedom is 12.7, and the interval
    # widens multiplicatively, never below zero
    low, high = median_ci(np.array([0.01, 0.02, 5.0, 8.0]), block_medians=[5.0, 8.0])
    assert 0 < low < 5.0 and high > 8.0
    # past ten sessions Student's t is not yet 1.96 (12 sessions: 2.201, the interval 11 % wider)
    from edgeport.runtime.latency import t_975
    assert t_975(1) == 12.706 and t_975(11) == 2.201 and t_975(40) == pytest.approx(2.021, abs=0.002)


def test_verify_without_inputs_draws_real_inputs_shaped_as_the_exports(tmp_path):
    """Re-checked later without inputs, an artifact is verified on seeded draws shaped as its
    export's example — sentences of the exported length with masks that keep a prefix — so
    that a weight changed in the file fails, where near-zero inputs once let it pass."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4)).eval()
    artifact = ep.export(model, torch.randn(1, 16), out=tmp_path, dynamic_batch=True)["onnx"]
    assert artifact.settings["example_shapes"] == [[1, 16]]
    report = ep.verify(artifact.path, model)
    assert report.passed and report.inputs_source.startswith("a seeded example shaped as the export's + 3 seeded")
    assert artifact.summary().splitlines()[1:4] == [
        "  inputs: input batchx16 float32", "  outputs: output_0 batchx4 float32",
        "  parity onnxruntime vs torch on 4 samples (the example + 3 seeded random inputs): passed"]
    graph = onnx.load(str(artifact.path))
    weight = next(i for i in graph.graph.initializer if tuple(i.dims) in ((32, 16), (16, 32)))
    values = numpy_helper.to_array(weight).copy()
    values[[0, 1]] = values[[1, 0]]
    weight.CopyFrom(numpy_helper.from_array(values, weight.name))
    onnx.save(graph, str(artifact.path))
    assert not ep.verify(artifact.path, model).passed
    rng = np.random.default_rng(0)
    masks = draw_input("attention_mask", [64, 12], np.dtype("int64"), rng)
    kept = masks.sum(axis=1)
    assert (kept >= 1).all() and len(set(kept)) > 3
    assert (masks == (np.arange(12) < kept[:, None])).all()  # ones over a prefix, as padding leaves them


def test_a_longer_input_than_a_fixed_axis_is_refused_not_cut(tmp_path):
    """A batch is split only along a static axis of size one (a batch of one exported
    static); 17 features against 16, or 40 tokens against a fixed 16, are refused by name."""
    model = nn.Sequential(nn.Linear(16, 4)).eval()
    artifact = ep.export(model, torch.randn(1, 16), out=tmp_path)["onnx"]
    assert len(feeds_from(["input"], [torch.randn(3, 16)], artifact.inputs)) == 3
    with pytest.raises(ep.UserError, match=r"input 'input' is float32 of shape 1x17; the artifact takes float32 of shape 1x16"):
        ep.verify(artifact, model, [torch.randn(1, 17)])
    with pytest.raises(ep.UserError, match=r"shape 1x32; the artifact takes float32 of shape 1x16"):
        ep.verify(artifact, model, [torch.randn(1, 32)])


class ConvBN(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8)

    def forward(self, x):
        return self.bn(self.conv(x)).relu()


def test_a_corrupted_conv_weight_is_charged_to_the_conv_its_batchnorm_was_folded_into(tmp_path):
    """The ONNX exporter folds the BatchNorm into the conv, so the file's Conv yields the
    BatchNorm's output tensor (a `getitem` of its tuple): the departure names the conv, with
    the BatchNorm noted as folded in, and both ATen ops, never Python's `getitem`."""
    torch.manual_seed(0)
    model = ConvBN().eval()
    with torch.no_grad():  # statistics away from identity, so folding changes the conv's numbers
        model.bn.running_mean.uniform_(-1, 1)
        model.bn.running_var.uniform_(0.5, 2)
    example = torch.randn(1, 3, 8, 8)
    path = ep.export(model, example, out=tmp_path)["onnx"].path
    graph = onnx.load(str(path))
    conv = next(node for node in graph.graph.node if node.op_type == "Conv")
    assert not any(node.op_type == "BatchNormalization" for node in graph.graph.node)  # folded
    weight = next(i for i in graph.graph.initializer if i.name == conv.input[1])
    values = numpy_helper.to_array(weight).copy()
    values[[0, 1]] = values[[1, 0]]
    weight.CopyFrom(numpy_helper.from_array(values, weight.name))
    onnx.save(graph, str(path))
    with pytest.warns(ep.EdgeportWarning, match="changed since edgeport exported"):
        report = ep.verify(path, model, [example], localize=True)
    first = report.localization[0].first
    assert not report.passed and first.name == conv.output[0] and first.candidate_op == "Conv"
    assert first.module == "conv (+ bn folded in)"
    assert first.op == "aten.conv2d.default + aten._native_batch_norm_legit_no_training.default"


def test_measure_counts_and_rejects_bad_counts(cnn_artifact):
    runner = OnnxRuntimeRunner(cnn_artifact.path).load()
    feeds = [{"x": ep.zoo.testset("cnn-digits")[0][i:i + 1].numpy()} for i in range(4)]
    stats = measure(runner, feeds, runs=30, warmup=3)
    assert len(stats.samples_ms) == 30 and all(s > 0 for s in stats.samples_ms)
    for runs in (0, -5):
        with pytest.raises(ep.UserError, match="runs must be positive"):
            measure(runner, feeds, runs=runs)


def test_unavailable_backends_say_why():
    with pytest.raises(ep.BackendUnavailable, match="onnxruntime TensorrtExecutionProvider is unavailable"):
        OnnxRuntimeRunner("unused.onnx", providers=["TensorrtExecutionProvider"]).load()
    if not torch.cuda.is_available():
        with pytest.raises(ep.BackendUnavailable, match="no CUDA device"):
            TorchRunner(ep.zoo.load("cnn-digits"), ["x"], device="cuda")


def test_corrupt_onnx_file_is_a_user_error(tmp_path):
    (tmp_path / "bad.onnx").write_bytes(b"\x08\x07garbage")
    with pytest.raises(ep.UserError, match="onnxruntime cannot load"):
        OnnxRuntimeRunner(tmp_path / "bad.onnx").load()
