"""Post-training quantization: quantizers, exact reparameterization, the pipeline, QDQ export."""

import re
import warnings

import numpy as np
import onnx
import pytest
import torch
from torch import nn

import edgeport as ep
from edgeport.export.tensorrt import check_readiness
from edgeport.quant.calibrate import minmax
from edgeport.quant.config import FORM_TIE
from edgeport.quant.quantizers import LogSqrt2Quantizer, UniformQuantizer
from edgeport.quant.reparam import fold_into_linear, fold_targets
from edgeport.sdk import FORM_THREADS


def test_rounding_is_half_to_even_like_onnx():
    q = UniformQuantizer(8, symmetric=True)
    q.set_range(torch.tensor(-127.0), torch.tensor(127.0))  # scale 1
    x = torch.tensor([0.5, 1.5, 2.5, -0.5, -1.5])
    assert q(x).tolist() == [0.0, 2.0, 2.0, -0.0, -2.0]


def test_per_channel_codes_respect_the_bit_width():
    q = UniformQuantizer(3, axis=0)
    w = torch.randn(4, 50)
    q.set_range(*minmax(w, q))
    codes = q.codes(w)
    assert codes.min() >= 0 and codes.max() <= 7 and q.scale.shape == (4,)


def test_log_sqrt2_shift_form_and_strict_encoding():
    q = LogSqrt2Quantizer(4, strict=True)
    q.scale, q.fitted = torch.tensor(0.8), True
    attention = torch.softmax(torch.randn(8, 16, 16) * 3, dim=-1)
    assert torch.allclose(q(attention), q.shift_form(attention), rtol=1e-6, atol=0)
    assert len(torch.unique(q(attention))) <= 2 ** 4  # b bits hold every state, exact zero included
    reference = LogSqrt2Quantizer(4, strict=False)
    reference.scale, reference.fitted = torch.tensor(0.8), True
    levels = torch.cat([0.8 * torch.exp2(-torch.arange(0, 40) / 2.0), torch.zeros(1)])
    assert len(torch.unique(reference(levels))) == 2 ** 4 + 1  # the reference encoding needs b + 1 bits


@pytest.mark.parametrize("bits", [-1, 0, 1, 9, 16])
def test_bits_outside_2_to_8_are_refused(bits):
    with pytest.raises(ep.UserError, match="from 2 to 8"):
        UniformQuantizer(bits)


@pytest.mark.parametrize("symmetric", [False, True])
def test_reparameterization_is_exact(symmetric):
    """Per-channel codes on x equal per-tensor codes on x' = x / r - b, and the folded Linear
    computes the same function (RepQ with a rounded, or symmetric, target zero point)."""
    torch.manual_seed(0)
    channel_scale = torch.exp(torch.randn(64) * 1.5)
    x = (torch.randn(4, 50, 64) * channel_scale + torch.randn(64) * 3).double()
    per_channel = UniformQuantizer(4, axis=-1)
    per_channel.set_range(*minmax(x, per_channel))
    r, b, target_scale, target_zero = fold_targets(per_channel.scale, per_channel.zero_point,
                                                   symmetric_zero=8 if symmetric else None)
    x_prime = x / r - b
    codes_tensor = torch.clamp(torch.round(x_prime / target_scale) + target_zero, 0, 15)
    codes_channel = per_channel.codes(x.float()).double()
    assert (codes_tensor != codes_channel).float().mean() <= 1e-5  # fp32 ties may flip; fp64 none
    linear = nn.Linear(64, 32).double()
    folded = nn.Linear(64, 32).double()
    folded.load_state_dict(linear.state_dict())
    fold_into_linear(folded, r, b)
    assert (folded(x_prime) - linear(x)).abs().max() <= 1e-10
    linear32, folded32 = linear.float(), folded.float()
    assert (folded32(x_prime.float()) - linear32(x.float())).abs().max() <= 1e-5 * linear32(x.float()).abs().max()


def accuracy_and_agreement(model, reference, x, y):
    with torch.no_grad():
        prediction, expected = model(x).argmax(1), reference(x).argmax(1)
    return float((prediction == y).float().mean() * 100), float((prediction == expected).float().mean() * 100)


def test_zoo_vit_w8a8_and_w4a4():
    model = ep.zoo.load("vit-digits")
    x, y = ep.zoo.testset("vit-digits")
    fp32 = accuracy_and_agreement(model, model, x, y)[0]
    q8 = ep.quantize("vit-digits", method="repq", w_bits=8, a_bits=8)
    accuracy, agreement = accuracy_and_agreement(q8, model, x, y)
    assert fp32 - accuracy <= 1.0 and agreement >= 99.0
    assert q8.quant_report.reparameterized == [f"blocks.{i}.{n}" for i in range(4) for n in ("attn.qkv", "mlp.0")]
    w4 = {m: accuracy_and_agreement(ep.quantize("vit-digits", method=m, w_bits=4, a_bits=4), model, x, y)[1]
          for m in ("minmax", "percentile", "repq")}
    assert w4["repq"] >= max(w4["minmax"], w4["percentile"])


def optimized_op_types(path, folder) -> list[str]:
    """The op types of the graph ONNX Runtime runs for the model at `path`, after its fusions."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.optimized_model_filepath = str(folder / "optimized.onnx")
    ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return [n.op_type for n in onnx.load(options.optimized_model_filepath).graph.node]


@pytest.mark.parametrize("bits", [8, 4])
def test_qdq_export_matches_the_fake_quant_model(bits, tmp_path):
    qmodel = ep.quantize("vit-digits", w_bits=bits, a_bits=bits)
    images = ep.zoo.testset("vit-digits")[0]
    artifacts = ep.export(qmodel, images[:1], ["onnx", "tensorrt"], out=tmp_path,
                          verify_inputs=[images[i:i + 1] for i in range(32)])
    for artifact in artifacts.values():
        assert artifact.parity.passed and artifact.precision == f"w{bits}a{bits}"
        if bits == 8:
            assert artifact.parity.outputs[0].max_rel_error <= 1e-2
    if bits < 8:  # both sum the same integer codes (see test_narrow_products_sum_codes_as_the_export_does)
        assert artifacts["onnx"].parity.outputs[0].max_rel_error <= 1e-5
    # the TensorRT form is verified as TensorRT computes it: Q/DQ as written, not ONNX Runtime's
    # integer kernels (whose u8 x s8 products saturate on x86 CPUs without VNNI)
    from edgeport.export.registry import runner_for
    assert runner_for(artifacts["onnx"]).quantized_kernels and not runner_for(artifacts["tensorrt"]).quantized_kernels
    onnxruntime_ops, tensorrt_ops = ([n.op_type for n in onnx.load(str(a.path)).graph.node] for a in artifacts.values())
    # 17 Linears and the patch Conv quantize their input; 4 blocks x 2 matmuls both operands
    assert tensorrt_ops.count("QuantizeLinear") >= 18 + 16 and tensorrt_ops.count("DequantizeLinear") >= 2 * 18 + 16
    assert "MatMulInteger" not in tensorrt_ops
    # for ONNX Runtime: each block's fused qkv Linear as one Gemm between DQ and Q writing every
    # part's codes (each part's scale and zero point carried by its columns' weight scale and
    # int32 bias), split on the codes; the other 12 Linears with a bias and the 4 scaled
    # attention scores in integer form; at 8 bits the attention-weighted values (re-quantized, no
    # scale or bias after) stay QDQ. Below 8 bits every product sums integer codes, as the
    # fake-quant model does: the qkv Linears and the attention-weighted values are integer matmuls
    requantized = 4 if bits == 8 else 0
    assert onnxruntime_ops.count("Gemm") == requantized + 1  # and the head's, on the class token: 2-D
    assert onnxruntime_ops.count("Split") == requantized
    assert onnxruntime_ops.count("MatMulInteger") == 16 + 8 * (bits < 8)
    assert onnxruntime_ops.count("MatMul") == 4 * (bits == 8)
    # (one quantizer in front of the three parts' data movement where there were three after it)
    assert onnxruntime_ops.count("QuantizeLinear") == tensorrt_ops.count("QuantizeLinear") - 2 * requantized
    if bits < 8:  # narrower than int8: an integer Clip between Q and DQ
        assert "Clip" in onnxruntime_ops and "Clip" in tensorrt_ops
    else:  # the runtime folds every scale and bias into its integer kernel: no float Mul or Add is left
        optimized = optimized_op_types(artifacts["onnx"].path, tmp_path)
        assert optimized.count("MatMulIntegerToFloat") == 16 and optimized.count("QGemm") == 4 + 1
        assert optimized.count("Mul") == 0
        assert optimized.count("Add") == 4 * 2 + 1  # the residuals and the position embedding
        # and the roofline counts that epilogue as fused too, the residual Adds not
        integer, qdq = (ep.estimate(a.path) for a in artifacts.values())
        fused_adds = [n.name for n in integer.nodes if n.op_type == "Add" and n.bound == "fused"]
        assert len(fused_adds) == 12 and integer.macs == qdq.macs


def test_unsigned_int8_weights_hold_the_same_values_and_fuse_into_the_same_kernels(tmp_path):
    """`int8_weights="unsigned"` stores each 8-bit weight as uint8 with zero point 128, what x86
    CPUs without VNNI multiply exactly: every weight dequantizes to the same values as in the
    int8 file, ONNX Runtime runs the same integer ops, the file verifies against the fake-quant
    model on any host, and the sidecar says on which CPUs each form is exact."""
    from onnx import numpy_helper

    qmodel = ep.quantize("vit-digits", w_bits=8, a_bits=8)
    images = ep.zoo.testset("vit-digits")[0]
    artifacts = {form: ep.export(qmodel, images[:1], out=tmp_path / form, name=form, int8_weights=form,
                                 check=form == "unsigned", verify_inputs=[images[i:i + 1] for i in range(32)])["onnx"]
                 for form in ("signed", "unsigned")}

    def integer_weights(graph) -> dict[str, np.ndarray]:
        """Per DequantizeLinear or MatMulInteger reading a stored weight (2-D or more) with its
        zero point: the codes minus that zero point, what its integer arithmetic multiplies."""
        stored = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
        found = {}
        for node in graph.node:
            weight_index, zero_index = {"DequantizeLinear": (0, 2), "MatMulInteger": (1, 3)}.get(node.op_type, (0, 0))
            codes = stored.get(node.input[weight_index]) if zero_index < len(node.input) else None
            if codes is None or codes.ndim < 2:
                continue
            zero = stored[node.input[zero_index]].astype(np.int32)
            axis = next((a.i for a in node.attribute if a.name == "axis"), 1) % codes.ndim
            if node.op_type == "DequantizeLinear" and zero.ndim:  # per channel along `axis`
                zero = zero.reshape([-1 if d == axis else 1 for d in range(codes.ndim)])
            found[node.output[0]] = codes.astype(np.int32) - zero
        return found

    weights = {form: integer_weights(onnx.load(artifact.path).graph) for form, artifact in artifacts.items()}
    assert weights["signed"].keys() == weights["unsigned"].keys() and len(weights["signed"]) >= 18  # 17 Linears, 1 Conv
    assert all(np.array_equal(weights["signed"][name], weights["unsigned"][name]) for name in weights["signed"])
    stored_types = {form: {t.data_type for t in onnx.load(a.path).graph.initializer if len(t.dims) >= 2}
                    for form, a in artifacts.items()}
    assert onnx.TensorProto.INT8 in stored_types["signed"] and onnx.TensorProto.INT8 not in stored_types["unsigned"]
    assert sorted(optimized_op_types(artifacts["signed"].path, tmp_path)) == \
        sorted(optimized_op_types(artifacts["unsigned"].path, tmp_path))
    assert artifacts["unsigned"].parity.outputs[0].max_rel_error <= 1e-2
    assert artifacts["unsigned"].settings["int8_weights"].startswith("uint8 (asked for): exact on every CPU")
    assert "x86 CPUs without VNNI" in artifacts["signed"].settings["int8_weights"]


# /proc/cpuinfo flags of an AVX2 CPU (AMD EPYC, Zen 3) and of an AVX-512 VNNI one (Intel Xeon, Cascade Lake)
ZEN3_FLAGS = ("flags\t\t: fpu vme de pse tsc msr pae mce cx8 apic sep mtrr pge mca cmov pat pse36 clflush mmx fxsr sse "
              "sse2 ht syscall nx mmxext fxsr_opt pdpe1gb rdtscp lm constant_tsc rep_good nopl pni pclmulqdq ssse3 fma "
              "cx16 pcid sse4_1 sse4_2 x2apic movbe popcnt aes xsave avx f16c rdrand hypervisor lahf_lm avx2 smep bmi2 "
              "erms invpcid rdseed adx smap clflushopt clwb sha_ni xsaveopt xsavec xgetbv1 xsaves vaes vpclmulqdq rdpid")
CASCADE_LAKE_FLAGS = ("flags\t\t: fpu vme de pse tsc msr pae mce cx8 apic sep mtrr pge mca cmov pat pse36 clflush mmx "
                      "fxsr sse sse2 ss ht syscall nx pdpe1gb rdtscp lm constant_tsc rep_good nopl xtopology nonstop_tsc "
                      "pni pclmulqdq ssse3 fma cx16 pcid sse4_1 sse4_2 x2apic movbe popcnt aes xsave avx f16c rdrand "
                      "hypervisor lahf_lm abm 3dnowprefetch fsgsbase bmi1 hle avx2 smep bmi2 erms invpcid rtm mpx "
                      "avx512f avx512dq rdseed adx smap clflushopt clwb avx512cd avx512bw avx512vl xsaveopt xsavec "
                      "xgetbv1 xsaves arat avx512_vnni md_clear arch_capabilities")


@pytest.mark.parametrize("machine, flags, saturates", [("x86_64", ZEN3_FLAGS, True), ("x86_64", CASCADE_LAKE_FLAGS, False),
                                                       ("x86_64", "", True), ("aarch64", "", False)])
def test_which_hosts_saturate_int8_weights(machine, flags, saturates, monkeypatch):
    """"auto" stores int8 weights only where the host's ONNX Runtime multiplies uint8 by int8
    exactly: an x86 CPU with VNNI (or AMX), or a non-x86 one; x86 flags that cannot be read
    count as saturating."""
    from edgeport.devices import catalog

    monkeypatch.setattr(catalog.platform, "machine", lambda: machine)
    monkeypatch.setattr(catalog, "cpu_flags", lambda: flags)
    assert catalog.u8s8_saturates() is saturates


def test_a_failed_verification_names_saturation_where_the_host_and_the_file_allow_it(tmp_path, monkeypatch):
    """A verification failure on a host that saturates uint8 x int8 says so where the file has
    int8 weights past [-64, 63], and stays silent for uint8 weights, 4-bit ones and other hosts."""
    from edgeport.export import onnx as onnx_backend

    qmodel, qmodel4 = ep.quantize("cnn-digits"), ep.quantize("cnn-digits", w_bits=4, a_bits=8)
    example = ep.zoo.example("cnn-digits")
    artifacts = {form: ep.export(qmodel, example, out=tmp_path / form, int8_weights=form, check=False)["onnx"]
                 for form in ("signed", "unsigned")}
    artifacts["w4"] = ep.export(qmodel4, example, out=tmp_path / "w4", int8_weights="signed", check=False)["onnx"]
    for saturates in (True, False):
        monkeypatch.setattr(onnx_backend, "u8s8_saturates", lambda: saturates)
        hints = {form: onnx_backend.saturation_hint(artifact) for form, artifact in artifacts.items()}
        assert bool(hints["signed"]) is saturates and hints["unsigned"] == hints["w4"] == ""
    monkeypatch.setattr(onnx_backend, "u8s8_saturates", lambda: True)
    assert "multiplies uint8 by int8 inexactly" in onnx_backend.saturation_hint(artifacts["signed"])


def test_quantized_export_with_a_dynamic_batch(tmp_path):
    """torch.export traces a dynamic batch with fake tensors; fake quantization needs fake
    kernels for that (without them no exporter takes a width below 8 bits)."""
    import onnxruntime as ort

    qmodel = ep.quantize("vit-digits", w_bits=4, a_bits=4)
    images = ep.zoo.testset("vit-digits")[0]
    artifact = ep.export(qmodel, images[:1], out=tmp_path, dynamic_batch=True)["onnx"]
    assert artifact.exporter == "torch.export" and artifact.parity.passed
    session = ort.InferenceSession(str(artifact.path), providers=["CPUExecutionProvider"])
    assert session.run(None, {session.get_inputs()[0].name: images[:8].numpy()})[0].shape == (8, 10)


def test_qdq_export_is_bit_exact_where_no_product_of_two_grids_is_requantized(tmp_path):
    """Without the attention-weighted values (a product of two quantized operands lands on a
    lattice whose points sit on the next quantizer's rounding ties, decided by the last bit
    of float summation order), the 4-bit export equals the fake-quant model to float
    rounding: the Q/Clip/DQ translation itself is exact."""
    from edgeport.quant.ptq import QuantMatMul

    qmodel = ep.quantize("vit-digits", w_bits=4, a_bits=4)
    for name, module in qmodel.named_modules():
        if isinstance(module, QuantMatMul) and name.endswith("matmul1"):
            module.left.enabled = module.right.enabled = False
    images = ep.zoo.testset("vit-digits")[0]
    artifact = ep.export(qmodel, images[:1], out=tmp_path, verify_inputs=[images[i:i + 1] for i in range(32)])["onnx"]
    assert artifact.parity.outputs[0].max_rel_error <= 1e-5


def test_attention_matmuls_are_quantized_and_the_softmax_quantizer_is_chosen():
    from edgeport.quant.ptq import QuantMatMul
    from edgeport.quant.quantizers import LogSqrt2Quantizer, UniformQuantizer

    qmodel = ep.quantize("vit-digits", w_bits=8, a_bits=8)
    report = qmodel.quant_report
    assert report.matmuls == [f"blocks.{i}.attn.matmul{k}" for i in range(4) for k in (0, 1)]
    probabilities = [m.left for n, m in qmodel.named_modules() if isinstance(m, QuantMatMul) and n.endswith("1")]
    assert all(isinstance(q, (UniformQuantizer, LogSqrt2Quantizer)) and q.fitted for q in probabilities)
    assert len(report.float_ops) == sum(isinstance(q, LogSqrt2Quantizer) for q in probabilities)

    class Untraceable(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 4)

        def forward(self, x):
            return self.fc(x) if x.sum() > 0 else -self.fc(x)  # data-dependent control flow

    report = ep.quantize(Untraceable(), torch.rand(8, 4)).quant_report
    assert report.layers == ["fc"] and "not traceable by torch.fx" in report.matmuls_not_quantized



def test_sdpa_left_float_where_the_graph_cannot_be_captured_keeps_the_fx_matmuls(monkeypatch):
    """A model torch.fx traces whose attention is one scaled_dot_product_attention call goes
    through torch.export's graph; where that capture fails, the matmuls torch.fx found are still
    quantized and the report names the attention left float."""
    import edgeport.quant.ptq as ptq

    class Mixed(nn.Module):
        def __init__(self):
            super().__init__()
            self.q, self.k = nn.Linear(8, 8), nn.Linear(8, 8)

        def forward(self, x):
            attended = torch.nn.functional.scaled_dot_product_attention(self.q(x), self.k(x), x)
            return attended @ self.k(x).transpose(-2, -1)

    x = torch.randn(4, 6, 8)
    report = ep.quantize(Mixed().eval(), x).quant_report
    assert len(report.matmuls) == 3 and not report.matmuls_not_quantized  # SDPA's two products and the @
    monkeypatch.setattr(ptq, "exported_matmul_sites", lambda model, args: ([], "not capturable by torch.export (X)"))
    report = ep.quantize(Mixed().eval(), x).quant_report
    assert report.matmuls == ["matmul0"]
    assert report.matmuls_not_quantized == "scaled_dot_product_attention left float: not capturable by torch.export (X)"


@pytest.mark.parametrize("softmax_inside", [True, False])
def test_matmuls_inside_a_region_the_model_opens_are_found_with_their_softmax(softmax_inside):
    """Attention computed under `torch.autocast(enabled=False)` (EfficientViT's, and float32
    softmax attention in general) is a nested graph in torch.export's capture: its matmuls are
    found there in call order, the probabilities recognised as a softmax's whether the softmax
    runs inside the region or before it, and a weight passed into the region is not taken for
    an activation."""
    from edgeport.quant.exported_matmuls import MatMulSite, exported_matmul_sites

    class Region(nn.Module):
        def __init__(self):
            super().__init__()
            self.qkv, self.proj = nn.Linear(8, 24), nn.Parameter(torch.randn(8, 8))

        def forward(self, x):
            q, k, v = self.qkv(x).chunk(3, -1)
            probabilities = None if softmax_inside else (q @ k.transpose(-2, -1)).softmax(-1)
            with torch.autocast("cpu", enabled=False):
                if softmax_inside:
                    probabilities = (q.float() @ k.float().transpose(-2, -1)).softmax(-1)
                return (probabilities.float() @ v.float()) @ self.proj

    sites, why_not = exported_matmul_sites(Region().eval(), (torch.randn(2, 5, 8),))
    assert why_not == ""
    assert sites == [MatMulSite("", 0, False), MatMulSite("", 1, True)]


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_transformers_attention_is_quantized_from_the_exported_graph(attention, tmp_path):
    """torch.fx cannot trace `transformers`' BERT; the matmuls torch.export's graph shows are
    quantized in place, through SDPA (the default, computed in the open) and through eager
    attention (softmax -> dropout -> matmul), the probabilities' quantizer chosen as for the
    zoo ViT, and the export verifies against the fake-quant model."""
    import sys

    from edgeport.quant.ptq import QuantMatMul

    sys.path.insert(0, str(__import__("pathlib").Path(__file__).parent))
    from hf_models import ARCHITECTURES

    model, (ids, mask) = ARCHITECTURES["bert"]()
    model.set_attn_implementation(attention)
    qmodel = ep.quantize(model, (ids, mask), "repq", 8, 8)
    report = qmodel.quant_report
    assert report.matmuls == [f"encoder.layer.{i}.attention.self.matmul{k}" for i in range(2) for k in (0, 1)]
    assert "not traceable by torch.fx" not in report.matmuls_not_quantized
    matmuls = {n: m for n, m in qmodel.named_modules() if isinstance(m, QuantMatMul)}
    assert all(m.left.fitted and m.right.fitted for m in matmuls.values())  # every one was called in calibration
    quantizers = [m for m in qmodel.modules() if hasattr(m, "enabled")]
    for quantizer in quantizers:  # with every quantizer off, the routed attention is the float one
        quantizer.enabled = False
    with torch.no_grad():
        assert torch.allclose(qmodel(ids, mask).last_hidden_state, model(ids, mask).last_hidden_state, atol=1e-5)
    for quantizer in quantizers:
        quantizer.enabled = True
    artifact = ep.export(qmodel, (ids, mask), out=tmp_path)["onnx"]
    assert all(output.passed for output in artifact.parity.outputs)
    graph = onnx.load(artifact.path).graph
    # scores and probabilities x values: every MatMul of two activations reads dequantized codes
    producer = {out: node for node in graph.node for out in node.output}
    float_products = [n.name for n in graph.node if n.op_type == "MatMul"
                      and not all(producer.get(i) is not None and producer[i].op_type == "DequantizeLinear"
                                  for i in n.input)]
    assert not float_products
    # query, key and value (2 layers): bias, head reshape and transpose, then the attention
    # matmul's quantizer; written so that ONNX Runtime runs each as QGemm writing the codes itself
    assert "6 as re-quantizing Gemm" in {p.key: p.value for p in onnx.load(artifact.path).metadata_props}[
        "edgeport.quantized_matmuls"]
    # (and the pooler's, on the first token only: 2-D, which the exporter writes as a Gemm itself)
    assert optimized_op_types(artifact.path, tmp_path).count("QGemm") == 6 + 1



def test_a_linear_requantized_without_a_head_reshape_runs_as_qgemm(tmp_path):
    """Single-head attention: the query's and the value's Linears are re-quantized directly and
    the key's after a transpose, so the 2-D Gemm's rows are put back into the Linear's own shape;
    a dynamic batch and sequence reach it, and the export verifies against the fake-quant model.
    At 4 bits the int32 bias would be rounded by more than MAX_BIAS_ROUNDING of an output step:
    those Linears keep their float bias."""
    class SingleHead(nn.Module):
        def __init__(self):
            super().__init__()
            self.query, self.key, self.value = nn.Linear(16, 16), nn.Linear(16, 16), nn.Linear(16, 16)

        def forward(self, x):
            scores = self.query(x) @ self.key(x).transpose(-2, -1)
            return scores.softmax(-1) @ self.value(x)

    torch.manual_seed(0)
    model, x = SingleHead().eval(), torch.randn(8, 12, 16)
    for bits, gemms in ((8, 3), (4, 0)):
        qmodel = ep.quantize(model, x, "repq", bits, bits)
        artifact = ep.export(qmodel, x[:2], out=tmp_path, name=f"w{bits}", dynamic_batch=True,
                             dynamic_axes={"x": {1: "tokens"}}, verify_inputs=[x[i:i + 3, : 5 + i] for i in range(4)])["onnx"]
        assert artifact.parity.passed
        assert f"{gemms} as re-quantizing Gemm" in {p.key: p.value for p in onnx.load(artifact.path).metadata_props}[
            "edgeport.quantized_matmuls"]
        assert optimized_op_types(artifact.path, tmp_path).count("QGemm") == gemms


def test_outlier_channels_migrate_into_the_weight_where_the_output_error_says_so(tmp_path):
    """A GELU output with one channel 25x the others (MiniLM's FFN input): repq scales that
    channel down in front of the quantizer and up in the weight, the layer's output error on
    the calibration batch drops to under half of plain repq's, and the export verifies."""
    from edgeport.quant.config import preset

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.up, self.down, self.plain = nn.Linear(16, 64), nn.Linear(64, 16), nn.Linear(16, 16)

        def forward(self, x):
            hidden = torch.nn.functional.gelu(self.up(x))
            return self.plain(self.down(hidden * self.gain))

    torch.manual_seed(0)
    model = Block().eval()
    model.gain = torch.ones(64)
    model.gain[7] = 25.0
    x = torch.randn(256, 16)
    migrated = ep.quantize(model, x, config=preset("repq"))
    plain = ep.quantize(model, x, config=preset("repq", migrate_outliers=False))
    assert "down" in [line.split(":")[0] for line in migrated.quant_report.outlier_migrations]
    assert not plain.quant_report.outlier_migrations
    with torch.no_grad():
        reference = model(x)
        assert ((migrated(x) - reference) ** 2).mean() < 0.5 * ((plain(x) - reference) ** 2).mean()
    artifact = ep.export(migrated, x[:4], out=tmp_path)["onnx"]
    assert all(output.passed for output in artifact.parity.outputs)


def test_norm_fold_is_exact_and_only_where_the_norm_feeds_nothing_else(monkeypatch):
    """Pre-norm (the zoo ViT): the reparameterization moves into the LayerNorm's affine, the
    quantizer sees the same values (<= 1e-5) and codes. Post-norm (the norm's output is also
    the residual): the affine stays in front of the quantizer."""
    from edgeport.quant import ptq

    images = ep.zoo.calibration("vit-digits", 32)
    folded = ep.quantize("vit-digits", calib=images)
    monkeypatch.setattr(ptq, "_fold_into_norm", lambda norm, layers: None)
    unfolded = ep.quantize("vit-digits", calib=images)
    assert folded.get_submodule("blocks.0.attn.qkv").pre_scale is None
    assert unfolded.get_submodule("blocks.0.attn.qkv").pre_scale is not None
    seen = {}
    for tag, model in (("folded", folded), ("unfolded", unfolded)):
        quantizer = model.get_submodule("blocks.0.attn.qkv").act
        hook = quantizer.register_forward_pre_hook(lambda m, a, tag=tag: seen.setdefault(tag, a[0]))
        with torch.no_grad():
            model(images)
        hook.remove()
    quantizer = folded.get_submodule("blocks.0.attn.qkv").act
    assert (seen["folded"] - seen["unfolded"]).abs().max() <= 1e-5
    assert (quantizer.codes(seen["folded"]) != quantizer.codes(seen["unfolded"])).float().mean() <= 1e-4

    class PostNorm(nn.Module):
        def __init__(self):
            super().__init__()
            self.norm, self.fc = nn.LayerNorm(8), nn.Linear(8, 8)

        def forward(self, x):
            h = self.norm(x)
            return h + self.fc(h)

    monkeypatch.undo()
    post = ep.quantize(PostNorm(), torch.randn(16, 5, 8) * torch.linspace(0.1, 10, 8))
    assert post.quant_report.reparameterized == ["fc"] and post.get_submodule("fc").pre_scale is not None

    class UnusedNorm(PostNorm):  # a norm whose output reaches nothing is no fold target
        def forward(self, x):
            self.norm(x)
            return self.fc(x)

    assert ep.quantize(UnusedNorm(), torch.randn(16, 5, 8)).quant_report.reparameterized == []


def test_entropy_calibration_at_8_bits():
    model = ep.zoo.load("vit-digits")
    x, y = ep.zoo.testset("vit-digits")
    qmodel = ep.quantize("vit-digits", method="minmax", act_observer="entropy")
    assert accuracy_and_agreement(qmodel, model, x, y)[1] >= 99.0


def test_tensorrt_mode_export_is_ready_and_default_mode_is_not(tmp_path):
    """A model quantized for ONNX Runtime exports to the tensorrt target with a warning that
    names a violation and the remedy, and a trtexec script that says it is not ready."""
    images = ep.zoo.testset("cnn-digits")[0]
    for target, ready in (("tensorrt", True), ("onnxruntime", False)):
        qmodel = ep.quantize("cnn-digits", target=target)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            artifact = ep.export(qmodel, images[:1], ["tensorrt"], out=tmp_path / target)["tensorrt"]
        assert artifact.parity.passed and check_readiness(artifact.path).ready == ready
        assert artifact.settings["tensorrt"]["readiness"]["ready"] == ready
        warned = [str(w.message) for w in caught if issubclass(w.category, ep.EdgeportWarning)]
        script = artifact.path.with_suffix(".trtexec.sh").read_text()
        if ready:
            assert not warned and "NOT READY" not in script
        else:
            assert len(warned) == 1 and "is not ready for TensorRT" in warned[0] and "[int8]" in warned[0]
            assert "target='tensorrt'" in warned[0] and "echo \"NOT READY" in script and "exit 1" in script


def test_a_quantized_zoo_model_keeps_its_zoo_name_as_the_source(tmp_path):
    """Its export records the zoo name (not the module's class), so profiling feeds it the
    zoo's test images and reports pair it with its float model; its file keeps the class name,
    clear of the float export's."""
    from edgeport.sdk import profile_feeds

    qmodel = ep.quantize("cnn-digits", method="minmax")
    artifact = ep.export(qmodel, ep.zoo.example("cnn-digits"), out=tmp_path)["onnx"]
    assert qmodel.zoo_name == "cnn-digits" and artifact.settings["source"] == "cnn-digits"
    assert artifact.path.name != "cnn-digits.onnx"
    assert profile_feeds(artifact, None)[1] == "cnn-digits test images"


def test_conv_batchnorm_is_folded():
    qmodel = ep.quantize("cnn-digits", method="minmax")
    assert len(qmodel.quant_report.batchnorm_folds) == 4
    assert not any(isinstance(m, nn.BatchNorm2d) for m in qmodel.modules())


def test_a_conv_and_norm_run_every_timestep_fold_and_a_norm_that_cannot_is_named():
    """The spiking zoo net calls each conv and its BatchNorm once per timestep: every call is
    one of their pairs, so they fold. A norm whose conv output another layer also reads stays,
    named in the report's float ops."""
    float_model = ep.zoo.load("snn-digits")
    images = ep.zoo.testset("snn-digits")[0][:32]
    qmodel = ep.quantize(float_model, images, method="minmax")
    assert qmodel.quant_report.batchnorm_folds == ["conv1.0", "conv2.0"]
    assert not any(isinstance(m, nn.BatchNorm2d) for m in qmodel.modules())
    with torch.no_grad():
        assert torch.cosine_similarity(qmodel(images).flatten(), float_model(images).flatten(), 0) > 0.99

    class SharedOutput(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.norm, self.head = nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.Linear(4 * 36, 2)

        def forward(self, x):
            y = self.conv(x)
            return self.head((self.norm(y) + y).flatten(1))

    report = ep.quantize(SharedOutput().eval(), torch.randn(8, 1, 8, 8), method="minmax").quant_report
    assert report.batchnorm_folds == []
    assert [line for line in report.float_ops if "BatchNorm2d" in line] == [
        "norm: BatchNorm2d not folded (it does not read, on every call, a Conv2d output that only it reads)"]


def test_quantization_bad_input():
    model = ep.zoo.load("vit-digits")
    with pytest.raises(ep.UserError, match="does not accept calibration data of shape \\[32, 3, 8, 8\\] float32"):
        ep.quantize(model, torch.zeros(32, 3, 8, 8))
    with pytest.raises(ep.UserError, match=r"\[32, 1, 8, 8\] int64"):
        ep.quantize(model, torch.zeros(32, 1, 8, 8, dtype=torch.int64))
    with pytest.raises(ep.UserError, match="empty"):
        ep.quantize(model, torch.zeros(0, 1, 8, 8))
    with pytest.raises(ep.UserError, match="from 2 to 8"):
        ep.quantize("vit-digits", w_bits=1)
    with pytest.raises(ep.UserError, match="no Linear or Conv2d"):
        ep.quantize(nn.Sequential(nn.ReLU()), torch.randn(4, 3))
    with pytest.raises(ep.UserError, match="unknown quantization method"):
        ep.quantize("vit-digits", method="awq")


def test_cli_quantize(tmp_path, capsys):
    import json

    from edgeport.cli import main

    assert main(["quantize", "cnn-digits", "--w-bits", "6", "--a-bits", "6", "-o", str(tmp_path), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["artifacts"]["onnx"]["parity"]["passed"] and result["report"]["w_bits"] == 6
    # the task's view of the cost: top-1 on the zoo's held-out digits, float beside quantized
    images, labels = ep.zoo.testset("cnn-digits")
    with torch.no_grad():
        float_percent = float((ep.zoo.load("cnn-digits")(images).argmax(1) == labels).float().mean() * 100)
    accuracy = result["accuracy"]
    assert accuracy["test_images"] == 360 and accuracy["float_percent"] == pytest.approx(float_percent)
    assert 90 < accuracy["quantized_percent"] <= 100 and 90 < accuracy["agreement_percent"] <= 100
    # a changed prediction is the only way to move accuracy
    assert abs(accuracy["quantized_percent"] - accuracy["float_percent"]) <= 100 - accuracy["agreement_percent"] + 1e-9
    assert main(["quantize", "cnn-digits", "--a-bits", "12", "-o", str(tmp_path)]) == 2
    assert main(["quantize", "cnn-digits", "--calibration", "entropy", "-o", str(tmp_path), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["report"]["activation_calibration"] == "entropy" and result["artifacts"]["onnx"]["parity"]["passed"]


def test_cli_fastest_form_keeps_the_conv_form_timed_fastest(tmp_path, capsys):
    """`--fastest-form` quantizes in each conv form (cnn-digits' convs are all under 1 M
    multiply-adds and its head is a Linear, so each form quantizes something), times each
    distinct one beside fp32 and keeps the fastest: the artifact written is the chosen form's,
    and a target the timing does not apply to is refused."""
    import json

    from edgeport.cli import main

    assert main(["quantize", "cnn-digits", "--fastest-form", "-o", str(tmp_path), "--json"]) == 0
    printed = capsys.readouterr()
    result = json.loads(printed.out)
    form = result["conv_form"]
    # where the form kept timed slower than fp32 here (beyond a tie), the user is told so, on stderr
    slower = form["p50_ms"][form["chosen"]] > form["p50_ms"]["fp32"] * (1 + FORM_TIE)
    assert ("warning: the quantized form kept" in printed.err) == slower, (form, printed.err)
    # the small-conv form leaves the same convs float as the first: one model, timed once
    assert set(form["p50_ms"]) == {"fp32", "every conv float", "every conv integer"} and not form["left_out"]
    fastest = min(form["p50_ms"][f] for f in set(form["p50_ms"]) - {"fp32"})
    assert form["p50_ms"][form["chosen"]] <= fastest * (1 + FORM_TIE)  # a tie within it goes by fidelity
    assert bool(result["report"]["convs_kept_float"]) == (form["chosen"] != "every conv integer")
    assert result["artifacts"]["onnx"]["parity"]["passed"]
    # each export timed at 1 thread and at ONNX Runtime's default, its faster kept and named
    assert set(form["threads"]) == set(form["p50_ms"]) and set(form["threads"].values()) <= set(FORM_THREADS)
    assert main(["quantize", "cnn-digits", "--fastest-form", "-o", str(tmp_path)]) == 0
    printed = " ".join(capsys.readouterr().out.split())
    assert re.search(r"every conv float [0-9.]+ ms \((1 thread|ONNX Runtime's default threads)\)", printed)
    assert main(["quantize", "cnn-digits", "--fastest-form", "--target", "tensorrt", "-o", str(tmp_path)]) == 2
    assert "fastest_form times ONNX Runtime" in capsys.readouterr().err
    with pytest.raises(ep.UserError, match="neither max_drop"):
        ep.quantize("cnn-digits", fastest_form=True, max_drop=0.01)
    # bad calibration is the user's error, not a form left out (it used to end as "no conv form verified")
    model = ep.zoo.load("cnn-digits")
    with pytest.raises(ep.UserError, match="degenerate calibration"):
        ep.quantize(model, torch.zeros(4, *ep.zoo.example("cnn-digits").shape[1:]), fastest_form=True)


def test_a_form_kept_slower_than_fp32_beyond_the_tie_is_a_caveat():
    """Timings within FORM_TIE of fp32 are a tie on a shared machine and say nothing; beyond it
    the user hears that quantizing did not pay here, with both timings."""
    from edgeport.sdk import FormChoice

    def kept(ms: float) -> FormChoice:
        return FormChoice("every conv float", {"fp32": 1.0, "every conv float": ms}, {"fp32": 1, "every conv float": 0}, {})

    assert kept(0.8).caveat is None and kept(1 + FORM_TIE / 2).caveat is None
    assert "(every conv float, 1.200 ms) runs slower than its fp32 export (1.000 ms)" in kept(1.2).caveat


def test_conv_forms_timed_within_the_tie_are_kept_by_fidelity(monkeypatch, tmp_path):
    """Forms timed within FORM_TIE of the fastest are a tie on a shared machine: with every form
    tied, the one kept is the one whose export's outputs are closest to the fp32 export's, each
    form quantized and exported again here on its own to check."""
    import numpy as np

    import edgeport.quant.config as config
    from edgeport.export.onnx import OnnxRuntimeRunner
    from edgeport.quant.config import CONV_FORMS, preset

    model, images = ep.zoo.load("cnn-digits"), ep.zoo.testset("cnn-digits")[0][:16]
    monkeypatch.setattr(config, "FORM_TIE", 1e9)
    chosen = ep.quantize(model, images, fastest_form=True).conv_form.chosen

    def outputs(path) -> np.ndarray:
        runner = OnnxRuntimeRunner(path).load()
        return np.concatenate([list(runner.infer({"x": images[i:i + 1].numpy()}).values())[0] for i in range(16)]).ravel()

    reference = outputs(ep.export(model, images[:1], out=tmp_path, name="fp32")["onnx"].path)
    cosines = {}
    for form in ("every conv float", "every conv integer"):
        qmodel = ep.quantize(model, images, config=preset("repq", **CONV_FORMS[form]))
        output = outputs(ep.export(qmodel, images[:1], out=tmp_path, name=form.replace(" ", "-"))["onnx"].path)
        cosines[form] = float(output @ reference / (np.linalg.norm(output) * np.linalg.norm(reference)))
    assert cosines["every conv float"] != cosines["every conv integer"] and chosen == max(cosines, key=cosines.get)


def test_weights_are_stored_as_integers(tmp_path):
    """Quantized weights become int8 initializers (not re-quantized on every call), with the
    codes the graph itself computed."""
    qmodel = ep.quantize("cnn-digits", w_bits=4, a_bits=8)
    artifact = ep.export(qmodel, ep.zoo.example("cnn-digits"), out=tmp_path)["onnx"]
    model = onnx.load(str(artifact.path))
    int_weights = [i for i in model.graph.initializer if i.data_type == onnx.TensorProto.INT8 and len(i.dims) == 4]
    assert len(int_weights) == 4
    codes = onnx.numpy_helper.to_array(int_weights[0])
    assert codes.min() >= -8 and codes.max() <= 7  # 4-bit weights, clipped once, at export
    assert not any(n.op_type == "QuantizeLinear" and n.input[0] in {i.name for i in model.graph.initializer}
                   for n in model.graph.node)


def test_presets_are_named_quant_configs_and_overrides_copy_them():
    from edgeport.quant.config import PRESETS, QuantConfig, preset

    assert list(PRESETS) == ["minmax", "percentile", "repq", "repq-gptq", "erq", "repq-recon", "repq-gptq-recon",
                             "repq-adalog", "repq-dualclip", "repq-adalog-dualclip", "repq-adalog-live",
                             "repq-adalog-live-recon", "repq-adalog-live-rot", "repq-adalog-live-rot-recon",
                             "erq-heldout"]
    assert all(isinstance(c, QuantConfig) and c.name == name and c.description for name, c in PRESETS.items())
    config = preset("repq", w_bits=4, a_bits=6, target="tensorrt", act_observer="entropy", keep_8bit=None)
    assert (config.w_bits, config.a_bits, config.matmul_operand_bits, config.symmetric, config.target) == (
        4, 6, 6, True, "tensorrt")
    assert config.act_observer == "entropy" and config.norm_reparam and config.name == "repq"
    assert PRESETS["repq"].w_bits == 8 and not PRESETS["repq"].symmetric  # the registry entry is untouched
    assert config.weight_calibration == "mse" and PRESETS["repq"].weight_calibration == "minmax"


def test_unknown_presets_targets_and_switches_are_refused_by_name():
    from edgeport.quant.config import QuantConfig, preset

    with pytest.raises(ep.UserError, match="unknown quantization method 'awq'; choose one of minmax, percentile, repq"):
        preset("awq")
    with pytest.raises(ep.UserError, match="unknown quantization target 'tflite'; choose one of onnxruntime, tensorrt"):
        preset("repq", target="tflite")
    with pytest.raises(ep.UserError, match="unknown calibration method 'kl'; choose one of minmax, percentile, mse"):
        QuantConfig(act_observer="kl")
    with pytest.raises(ep.UserError, match="needs norm_reparam"):
        QuantConfig(fold_norm_affine=True)
    with pytest.raises(ep.UserError, match="choose one"):
        QuantConfig(partial_reparam=True, check_reparam_held_out=True)
    with pytest.raises(ep.UserError, match="per_channel, per_tensor"):
        QuantConfig(weight_granularity="per_block")
    with pytest.raises(ep.UserError, match="from 2 to 8"):
        QuantConfig(matmul_bits=1)


def test_a_custom_config_equal_to_a_preset_quantizes_identically():
    from edgeport.quant.config import QuantConfig, preset

    custom = QuantConfig(w_bits=4, a_bits=4, act_observer="mse", weight_observer="auto", norm_reparam=True,
                         fold_norm_affine=True, migrate_outliers=True, choose_softmax_quantizer=True)
    assert custom == preset("repq", w_bits=4, a_bits=4) and custom.name == "custom"
    by_config = ep.quantize("vit-digits", config=custom)
    by_method = ep.quantize("vit-digits", method="repq", w_bits=4, a_bits=4)
    images = ep.zoo.testset("vit-digits")[0][:64]
    with torch.no_grad():
        assert torch.equal(by_config(images), by_method(images))
    assert by_config.quant_report.method == "custom" and by_method.quant_report.method == "repq"
    assert by_config.quant_report.reparameterized == by_method.quant_report.reparameterized
    with pytest.raises(ep.UserError, match="pass either the config or those arguments"):
        ep.quantize("vit-digits", w_bits=4, config=custom)


def _fake_quantize(x, params):
    """x through the quantizer that `params` describe, computed from the parameters alone as
    QuantizeLinear does: dividing by the scale (a product's sum can land exactly on a rounding
    tie, which torch's multiplication by the reciprocal misses by an ulp)."""
    qmin, qmax = (-(2 ** (params.bits - 1)), 2 ** (params.bits - 1) - 1) if params.signed else (0, 2 ** params.bits - 1)
    return (torch.clamp(torch.round(x / params.scale) + params.zero_point, qmin, qmax) - params.zero_point) * params.scale


def test_qparams_describe_each_quantized_module_completely():
    """What an exporter reads from `qparams()` alone reproduces each module: the float layer
    on grid weights after the input quantizer (and the input affine a reparameterization
    left), the matmul with its operands' quantizers."""
    from edgeport.quant.config import QuantConfig
    from edgeport.quant.ptq import LayerQParams, QuantConv2d, QuantLinear, QuantMatMul
    from edgeport.quant.quantizers import LogSqrt2QParams, LogSqrt2Quantizer, UniformQParams
    from edgeport.sdk import precision_of

    qmodel = ep.quantize("vit-digits", w_bits=4, a_bits=4)
    inputs = {}
    hooks = [m.register_forward_pre_hook(lambda m, args: inputs.setdefault(m, args)) for m in qmodel.modules()
             if isinstance(m, (QuantLinear, QuantConv2d, QuantMatMul))]
    with torch.no_grad():
        qmodel(ep.zoo.testset("vit-digits")[0][:8])
    for h in hooks:
        h.remove()
    kinds = set()
    for module, args in inputs.items():
        params = module.qparams()
        kinds.add(type(module))
        with torch.no_grad():
            if isinstance(params, LayerQParams):
                assert isinstance(params.layer, type(module.inner)) and params.input_affine is None
                assert (params.input.bits, params.input.signed, params.input.axis) == (4, False, None)
                assert (params.weight.bits, params.weight.signed, params.weight.axis) == (4, True, 0)
                codes = params.layer.weight / params.weight.scale.reshape([-1] + [1] * (params.layer.weight.ndim - 1))
                assert torch.allclose(codes, codes.round(), atol=1e-4) and codes.abs().max() <= 8
                expected = params.layer(_fake_quantize(args[0], params.input))
                assert params.output is None  # an output quantizer only where an 8-bit conv becomes QLinearConv
            else:
                assert isinstance(params.right, UniformQParams) and params.right.bits == 4
                left = (LogSqrt2Quantizer.from_qparams(params.left)(args[0]) if isinstance(params.left, LogSqrt2QParams)
                        else _fake_quantize(args[0], params.left))
                expected = left @ _fake_quantize(args[1], params.right)
            assert torch.allclose(module(*args), expected, rtol=1e-5, atol=1e-5)
    assert kinds == {QuantLinear, QuantConv2d, QuantMatMul}

    class PostNorm(nn.Module):  # the norm also feeds the residual: the affine stays in front of the quantizer
        def __init__(self):
            super().__init__()
            self.norm, self.fc = nn.LayerNorm(8), nn.Linear(8, 8)

        def forward(self, x):
            h = self.norm(x)
            return h + self.fc(h)

    x = torch.randn(16, 5, 8) * torch.linspace(0.1, 10, 8)
    post = ep.quantize(PostNorm(), x, target="tensorrt")
    params = post.get_submodule("fc").qparams()
    h = post.get_submodule("norm")(x)
    scale, shift = params.input_affine
    assert params.input.signed and int(params.input.zero_point) == 0
    with torch.no_grad():
        assert torch.allclose(post.get_submodule("fc")(h), params.layer(_fake_quantize(h * scale + shift, params.input)),
                              rtol=1e-5, atol=1e-5)

    conv = ep.quantize("vit-digits").get_submodule("patch_embed")
    params, x = conv.qparams(), torch.randn(2, 1, 8, 8)
    with torch.no_grad():
        assert torch.allclose(conv(x), _fake_quantize(params.layer(_fake_quantize(x, params.input)), params.output))

    narrow = ep.quantize("vit-digits", config=QuantConfig(matmul_bits=4, weight_granularity="per_tensor"))
    assert precision_of(narrow) == "w8a4"  # the narrowest activations are the matmul operands
    assert narrow.get_submodule("head").qparams().weight.scale.ndim == 0


def test_cli_quantize_help_lists_the_presets_and_observers(capsys):
    from edgeport.cli import main
    from edgeport.quant.config import PRESETS

    assert main(["quantize", "--help"]) == 0
    text = "".join(capsys.readouterr().out.split())  # click wraps the help text, at hyphens too
    assert ("[minmax|percentile|repq|repq-gptq|erq|repq-recon|repq-gptq-recon|repq-adalog|repq-dualclip|"
            "repq-adalog-dualclip|repq-adalog-live|repq-adalog-live-recon|repq-adalog-live-rot|"
            "repq-adalog-live-rot-recon|erq-heldout]" in text)
    assert "[minmax|percentile|mse|entropy|dualclip|clip]" in text
    assert all("".join(f"{name}: {config.description}".split()) in text for name, config in PRESETS.items())


def test_layer_sensitivity_ranks_each_layer_quantized_alone():
    from edgeport.quant.sensitivity import layer_sensitivity

    model, images = ep.zoo.load("vit-digits"), ep.zoo.testset("vit-digits")[0][:32]
    qmodel = ep.quantize(model, images, w_bits=4, a_bits=4)
    ranking = layer_sensitivity(model, qmodel, (images,), metric=lambda r, o: float((r - o).abs().max()))
    assert len(ranking) == len(qmodel.quant_report.layers) + len(qmodel.quant_report.matmuls)
    assert [r.sqnr_db for r in ranking] == sorted(r.sqnr_db for r in ranking) and ranking[0].metric > 0
    with torch.no_grad():  # the model's quantizers are switched back on
        assert not torch.equal(qmodel(images), model(images))


def test_mixed_precision_meets_the_budget_with_fewer_bits_on_samples_the_ranges_never_saw():
    """The budget bounds the cross-validated loss: each fold of the calibration batch judged
    with the map's ranges fitted on the other folds, the worst fold the figure; the returned
    model is calibrated on it all. A batch too small for the folds is judged whole."""
    import dataclasses

    from edgeport.quant.config import preset
    from edgeport.quant.ptq import quantize
    from edgeport.quant.sensitivity import FOLDS, HELD_OUT_MIN, choose_widths, cosine_drop

    model, images = ep.zoo.load("vit-digits"), ep.zoo.testset("vit-digits")[0][:16]
    config = preset("repq")
    qmodel, choice = choose_widths(model, images, config, max_drop=0.002)
    assert choice.held_out_drop <= 0.002 and choice.mean_bits < 8 and set(choice.widths.values()) <= {4, 6, 8}
    losses = []
    for fold in range(FOLDS):
        held = torch.arange(len(images)) % FOLDS == fold
        fitted, _ = quantize(model, images[~held], dataclasses.replace(config, keep_8bit=(), layer_widths=choice.widths))
        with torch.no_grad():
            losses.append(cosine_drop(model(images[held]).double().flatten(), fitted(images[held]).double().flatten()))
    assert max(losses) == pytest.approx(choice.held_out_drop, abs=1e-9)
    with torch.no_grad():
        assert cosine_drop(model(images).double().flatten(), qmodel(images).double().flatten()) == pytest.approx(
            choice.drop, abs=1e-9)
    _, small = choose_widths(model, images[:HELD_OUT_MIN - 1], config, max_drop=0.002)
    assert small.held_out_drop is None and small.drop <= 0.002


def test_a_task_metric_replaces_cosine_in_the_budget_and_the_sensitivity_ranking():
    """`ep.quantize(..., max_drop=, metric=)`: the budget bounds the caller's loss (here the
    logits' noise-to-signal ratio), and the sensitivity report scores every layer with it."""
    def noise_to_signal(reference: torch.Tensor, output: torch.Tensor) -> float:
        return float(((output - reference) ** 2).sum() / (reference ** 2).sum())

    images = ep.zoo.calibration("vit-digits", 32)
    model = ep.zoo.load("vit-digits")
    qmodel = ep.quantize(model, images, max_drop=0.01, metric=noise_to_signal, report="sensitivity")
    choice = qmodel.mixed_precision
    assert choice.held_out_drop <= 0.01 and choice.mean_bits < 8
    with torch.no_grad():
        assert noise_to_signal(model(images).double().flatten(), qmodel(images).double().flatten()) == pytest.approx(
            choice.drop, abs=1e-9)
    assert all(r.metric is not None for r in qmodel.sensitivity)
    head, *widths = choice.summary().splitlines()
    assert head.startswith(f"mixed precision: noise_to_signal {choice.drop:.5f} on the calibration data, ")
    assert len(widths) == len(choice.widths) and all(line.split()[0] in {"4", "6", "8"} for line in widths)
