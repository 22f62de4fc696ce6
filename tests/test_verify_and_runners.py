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


def swap_weight_rows(path, op_type: str) -> onnx.NodeProto:
    """Swap the first two rows of the weight of the first `op_type` node in the ONNX file at
    `path` (a planted fault of the same shape, which only numbers can reveal); returns the node."""
    graph = onnx.load(str(path))
    node = next(n for n in graph.graph.node if n.op_type == op_type)
    weight = next(i for i in graph.graph.initializer if i.name == node.input[1])
    values = numpy_helper.to_array(weight).copy()
    values[[0, 1]] = values[[1, 0]]
    weight.CopyFrom(numpy_helper.from_array(values, weight.name))
    onnx.save(graph, str(path))
    return node


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
    assert not any(node.op_type == "BatchNormalization" for node in onnx.load(str(path)).graph.node)  # folded
    conv = swap_weight_rows(path, "Conv")
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


# --- outputs that are not plain numbers, and tolerances that cannot judge -------------------------

def test_nan_outputs_fail_with_the_reason_and_equal_infinities_agree():
    """NaN agrees with nothing, NaN in the reference included (the model computes no number
    there, so nothing is proven); -inf against -inf (a masked logit) is agreement; a fill
    value of float32's lowest (transformers' mask) must match and cannot widen the scale."""
    values = np.array([1.0, np.nan, 3.0], np.float32)
    for tolerance in (TOLERANCES["fp32"], TOLERANCES["int8"], TOLERANCES["exact"]):
        both = judge("y", values, values.copy(), tolerance)
        assert not both.passed and both.mismatched == 1
        assert "the reference has 1 NaN" in both.tolerance.why and "nothing is proven" in both.tolerance.why
    finite = np.array([1.0, 2.0, 3.0], np.float32)
    candidate_nan = judge("y", finite, values, TOLERANCES["fp32"])
    assert not candidate_nan.passed and "the candidate has 1 NaN" in candidate_nan.tolerance.why
    masked = np.array([1.0, -np.inf, 3.0], np.float32)
    assert judge("y", masked, masked.copy(), TOLERANCES["fp32"]).passed
    assert judge("y", masked, masked.copy(), TOLERANCES["fp32"]).scale == 3.0
    assert not judge("y", masked, finite, TOLERANCES["fp32"]).passed
    lowest = np.finfo(np.float32).min
    filled = np.array([lowest, 1.0, 2.0], np.float32)
    off = judge("y", filled, filled + np.array([0, 0.5, 0], np.float32), TOLERANCES["fp32"])
    assert not off.passed and off.scale == 2.0 and off.max_rel_error == pytest.approx(0.25)
    assert judge("y", filled, filled.copy(), TOLERANCES["fp32"]).passed
    assert judge("y", filled, filled.astype(np.float16), TOLERANCES["fp16"]).passed  # -inf in fp16


def test_a_nan_reference_on_a_real_model_fails_without_a_traceback(cnn_artifact):
    model = ep.zoo.load("cnn-digits")
    with torch.no_grad():
        model.classifier.bias[3] = float("nan")
    images = ep.zoo.testset("cnn-digits")[0][:2].numpy()
    report = compare(TorchRunner(model, ["x"]).load(), OnnxRuntimeRunner(cnn_artifact.path).load(),
                     [{"x": images[i:i + 1]} for i in range(2)])
    assert not report.passed and report.outputs[0].mismatched >= 2 and report.outputs[0].max_abs_error == np.inf
    assert "the reference has 2 NaN" in report.summary()


def test_integer_outputs_are_compared_in_their_own_dtype():
    ids = np.array([2 ** 60, 7], np.int64)
    parity = judge("ids", ids, ids + np.array([1, 0]), TOLERANCES["exact"])  # one apart: equal in float64
    assert not parity.passed and parity.mismatched == 1 and parity.max_abs_error >= 1
    assert judge("ids", ids, ids.copy(), TOLERANCES["exact"]).passed


def test_agreeing_elements_keep_their_place_in_an_intermediate_scale():
    """Large values equal bit for bit and a tiny one off by 1e-6: 1e-9 of the tensor's scale,
    not 10 % of the tiny value's (zeroing the equal ones once made this a departure)."""
    from edgeport.verify import _judge_intermediate

    reference = np.array([1000, -1000, 1e-5], np.float32)
    assert _judge_intermediate("t", reference, np.array([1000, -1000, 1.1e-5], np.float32), "fp32").passed
    assert not _judge_intermediate("t", reference, np.array([1000, -999, 1e-5], np.float32), "fp32").passed


@pytest.mark.parametrize("tolerance, message", [
    (ep.Tolerance("relative-to-scale", max_error=float("nan")), "finite number >= 0"),
    (ep.Tolerance("relative-to-scale", max_error=-1e-4), "finite number >= 0"),
    (ep.Tolerance("relative-to-scale", max_error=float("inf")), "finite number >= 0"),
    (ep.Tolerance("cosine", min_cosine=float("nan"), min_sqnr_db=10), "between -1 and 1"),
    (ep.Tolerance("cosine", min_cosine=0.99, min_sqnr_db=float("nan")), "min_sqnr_db"),
    (ep.Tolerance("cosine", min_cosine=-1, min_sqnr_db=float("-inf")), "passes every output"),
    (ep.Tolerance("relative", max_error=1e-3), "not one of"),
])
def test_a_tolerance_that_cannot_judge_is_refused(cnn_artifact, tolerance, message):
    runner = OnnxRuntimeRunner(cnn_artifact.path).load()
    images = ep.zoo.testset("cnn-digits")[0][:1].numpy()
    with pytest.raises(ep.UserError, match=message):
        compare(runner, runner, [{"x": images}], tolerance=tolerance)


class ManyOutputs(nn.Module):
    def forward(self, x):
        return x.sum(), x.argmax(-1), x > 0, x[:, :0], x * 2


def test_scalar_integer_bool_and_empty_outputs_verify_on_a_real_export(tmp_path):
    from edgeport.verify import _joined

    artifact = ep.export(ManyOutputs().eval(), torch.randn(2, 5), out=tmp_path)["onnx"]
    outputs = artifact.parity.outputs
    assert artifact.parity.passed and [o.tolerance.kind for o in outputs[1:3]] == ["exact", "exact"]
    assert "no elements" in outputs[3].tolerance.why
    report = ep.verify(artifact, ManyOutputs().eval(), [torch.randn(2, 5), torch.randn(2, 5)])
    assert report.passed and report.outputs[1].shape == [4] and report.outputs[3].shape == [4, 0]
    with pytest.raises(ep.UserError, match=r"shape \[1, 1\] differs from reference \[\]"):
        _joined("y", [np.ones((), np.float32)], [np.ones((1, 1), np.float32)])  # once reshaped alike, and passed


class TokenMean(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(50, 8)

    def forward(self, ids):
        hidden = self.embed(ids)
        return hidden.mean(1), hidden


def test_batches_of_different_sequence_lengths_are_judged_element_by_element(tmp_path):
    torch.manual_seed(0)
    model = TokenMean().eval()
    artifact = ep.export(model, torch.randint(0, 50, (1, 6)), out=tmp_path,
                         dynamic_axes={"ids": {0: "batch", 1: "tokens"}})["onnx"]
    batches = [torch.randint(0, 50, (1, 4)), torch.randint(0, 50, (2, 7))]
    report = ep.verify(artifact, model, batches)
    assert report.passed and report.outputs[0].shape == [3, 8] and report.outputs[1].shape == [3, -1, 8]
    with torch.no_grad():
        model.embed.weight[batches[1][1, 6]] += 0.01  # one token of the longer batch
    assert not ep.verify(artifact, model, batches).passed


def test_a_corrupted_last_layer_is_localized_to_it(tmp_path):
    """The file names its graph output `output_0`, torch's graph `linear`: the classifier
    was compared with nothing, and a corrupted classifier showed no departure."""
    path = ep.export("cnn-digits", out=tmp_path)["onnx"].path
    swap_weight_rows(path, "Gemm")
    with pytest.warns(ep.EdgeportWarning, match="changed since edgeport exported"):
        report = ep.verify(path, ep.zoo.load("cnn-digits"), [ep.zoo.testset("cnn-digits")[0][:2]], localize=True)
    first = report.localization[0].first
    assert not report.passed and first is not None
    assert (first.module, first.name, first.candidate_op) == ("classifier", "output_0", "Gemm")
    assert all(row.parity.passed for row in report.localization[0].rows[:-1])


# --- latency statistics at their edges --------------------------------------------------------------

def test_median_interval_covers_95_percent_at_every_sample_count():
    """Exact binomial coverage of the interval's order statistics (samples 0..n-1 are their
    own ranks); the normal approximation once gave 94.75 % at 21 samples."""
    from math import comb

    for n in range(6, 240):
        low, high = (int(v) for v in median_ci(np.arange(n, dtype=float)))
        assert sum(comb(n, k) for k in range(low + 1, high + 1)) / 2 ** n >= 0.95, n
    assert median_ci(np.arange(1.0, 101.0)) == (40.0, 61.0)


def test_few_samples_are_flagged_for_what_they_cannot_show():
    one = summarize([2.0])
    assert one.cv == 0 and one.median_ci95 == (2.0, 2.0) and not one.valid
    assert any("no spread" in p for p in one.problems) and any("interval for the median" in p for p in one.problems)
    five = summarize([1.0, 2.0, 3.0, 4.0, 5.0])
    assert five.median_ci95 == (1.0, 5.0) and any("needs 6" in p for p in five.problems)
    ninety_nine = summarize([1.0 + 0.001 * (i % 7) for i in range(99)])
    assert ninety_nine.problems == ["99 samples are too few for p99 (needs 100)"]
    assert summarize([1.0 + 0.001 * (i % 7) for i in range(100)]).valid


def test_zero_nan_and_negative_samples_are_refused_with_the_reason():
    with pytest.raises(ep.UserError, match="median latency is 0 ms"):
        summarize([0.0] * 30)
    for bad in (float("nan"), float("inf"), -1.0):
        with pytest.raises(ep.UserError, match="finite and non-negative"):
            summarize([1.0] * 10 + [bad])
    from edgeport.runtime.latency import validity
    _, problems = validity(np.full(200, 0.5), 0.0, resolution_ms=0.01)  # a coarse clock
    assert any("timer's resolution" in p for p in problems)
    from edgeport.runtime.latency import t_975
    with pytest.raises(ValueError):
        t_975(0)


def test_sessions_of_unequal_length_keep_their_own_medians():
    """A session timed for a duration takes as many runs as fit: splitting the samples into
    equal parts mixed the sessions and hid the second one's slower median."""
    samples = [1.0] * 97 + [3.0] * 3
    split_equally = summarize(samples, blocks=2).median_ci95
    by_session = summarize(samples, block_sizes=[97, 3]).median_ci95
    assert split_equally == (1.0, 1.0) and by_session[1] > 3.0
    with pytest.raises(ep.UserError, match="add up to 99"):
        summarize(samples, block_sizes=[97, 2])


def test_interleaved_medians_and_a_run_that_raises(cnn_artifact):
    from edgeport.runtime.latency import interleaved_medians

    feed = {"x": ep.zoo.testset("cnn-digits")[0][:1].numpy()}
    runners = {("fp32", 1): OnnxRuntimeRunner(cnn_artifact.path, threads=1).load(),
               ("fp32", 2): OnnxRuntimeRunner(cnn_artifact.path, threads=2).load()}
    medians = interleaved_medians(runners, feed, blocks=3, runs=3, warmup=1)
    assert set(medians) == set(runners) and all(m > 0 for m in medians.values())
    for blocks, runs in ((0, 3), (3, 0)):
        with pytest.raises(ep.UserError, match="at least 1"):
            interleaved_medians(runners, feed, blocks=blocks, runs=runs)
    wrong = {"x": np.zeros((1, 3, 28, 28), np.float32)}  # three channels where the model takes one
    with pytest.raises(Exception) as raised:
        measure(runners["fp32", 1], [feed, feed, wrong], runs=10, warmup=0)
    assert any("while timing run 3 (input 3 of 3)" in note for note in raised.value.__notes__)
