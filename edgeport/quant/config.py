"""QuantConfig: what post-training quantization does, as data; the presets are named instances.

A config says how many bits each kind of tensor gets (the weights and the inputs of Linear
and Conv2d layers, the operands of activation x activation matmuls), the weights'
granularity, which observer calibrates each range, which RepQ-ViT reparameterizations run,
whether every quantizer is symmetric (what TensorRT takes) and which layers stay at 8 bits.
Activations are quantized per tensor, the form integer kernels take: per-channel activation
ranges exist only during calibration, where the LayerNorm reparameterization turns them into
per-tensor ones with the same codes.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from edgeport.errors import UserError
from edgeport.quant.calibrate import OBSERVERS, observer
from edgeport.quant.erq import DAMPING
from edgeport.quant.quantizers import check_bits

# "auto" weights: min-max at 8 bits, where a 256-level grid loses more to clipping than to
# rounding, MSE below. Measured on MiniLM W8A8: MSE for the weights gave cosine 0.990 (0.989
# for the refitted folded layers alone), min-max 0.9945.
AUTO_WEIGHT_OBSERVER = "auto"
# granularity -> the weight quantizer's axis (a weight's output channels are its axis 0)
WEIGHT_GRANULARITIES = {"per_channel": 0, "per_tensor": None}
# deployment target -> whether it needs symmetric quantizers (TensorRT's int8 has no zero point)
TARGETS = {"onnxruntime": False, "tensorrt": True}
# reconstruction steps per block of the "repq-recon" preset: on MiniLM W4A4 (6 blocks, 32 calibration
# sentences) 100 steps gave cosine 0.864, 300 steps 0.849 (overfitting the batch); at W8A8 100 steps
# lift the exported ONNX from 0.9963 to 0.9970 (about 35 s on 2 quiet threads)
RECON_ITERS = 100
# deployment target -> the export target (`edgeport.export.registry`) whose artifact it runs
EXPORT_TARGETS = {"onnxruntime": "onnx", "tensorrt": "tensorrt"}
# A conv "form" for ONNX Runtime at W8A8: which convs stay float (QuantConfig fields). ORT's integer
# kernels for depthwise, grouped and small dense convs beat its float ones on some models and lose on
# others (64x64, 2 threads: every conv integer 1.30x fp32 on EfficientFormerV2-S0 but 0.77x on FastViT-T8,
# where leaving grouped convs and dense ones under 1 M multiply-adds float gives 1.30x; on MobileViT-XS
# only every conv float, its transformer's Linears and matmuls integer, measured faster than fp32, 1.08x),
# and no threshold separates them: `ep.quantize(..., fastest_form=True)` times each form on the host
# instead. The forms go from the most float to none: where one leaves no conv float, the later ones are
# the same model.
SMALL_CONV_MACS = 1_000_000
CONV_FORMS = {"every conv float": {"float_convs_below_macs": 2 ** 62, "float_grouped_convs": True},
              "grouped and small convs float": {"float_convs_below_macs": SMALL_CONV_MACS, "float_grouped_convs": True},
              "every conv integer": {"float_convs_below_macs": 0, "float_grouped_convs": False}}
# forms timed within this share of the fastest are a tie, kept by fidelity instead: Swin-T's two
# forms timed 10.26 and 10.65 ms in one bench run and the other way round in the one before,
# while every conv integer cost held-out cosine 0.99910 against 0.99941
FORM_TIE = 0.05


@dataclass(frozen=True)
class QuantConfig:
    """How `edgeport.quant.ptq.quantize` quantizes a model.

    `w_bits` and `a_bits` are the widths of Linear and Conv2d weights and inputs (layers and
    activation matmuls named in `keep_8bit` get 8 for both), `matmul_bits` that of both
    operands of activation x activation matmuls (None: `a_bits`). Weights are symmetric, per output channel or per
    tensor (`weight_granularity`), fitted by `weight_observer` (a name in
    `edgeport.quant.calibrate.OBSERVERS`, or "auto"); activation ranges come from
    `act_observer`. `norm_reparam` calibrates a Linear input that is a LayerNorm's output per
    channel and reparameterizes it to per tensor, folded into the Linear (RepQ-ViT);
    `fold_norm_affine` then moves that reparameterization into the norm's own affine where
    the norm feeds nothing else. `migrate_outliers` scales the few input channels of a
    per-tensor Linear input whose range dwarfs the rest down into the weight (where the
    calibration error says it pays). `choose_softmax_quantizer` makes log-sqrt2 a candidate beside
    the uniform grid for a softmax output below 8 bits, the smaller error at the model's output
    choosing (at 8 bits the uniform grid keeps the integer kernel);
    `adalog` makes that candidate AdaLog (its log base searched per tensor) and gives the
    input of each Linear after a GELU an AdaLog quantizer where it beats the uniform one on
    the layer's output (`edgeport.quant.adalog`). `check_reparam_held_out` keeps the
    per-channel calibration of `norm_reparam` only for the layers where it beats a per-tensor
    input on calibration samples it was not fitted to (per-channel ranges fitted to few tokens
    clip new ones). `compensate_weights` rounds each Linear's weight with error feedback from
    the quantized input it really gets (GPTQ-style), after regressing weight and bias onto the float
    output where `weight_ridge` gives the ridge factor (ERQ-style; `edgeport.quant.erq`), `damping`
    the rounding's Hessian dampening (relative to its mean diagonal).
    `recon_iters`, where positive, reconstructs the calibrated model block by block, that many
    Adam steps per block (`edgeport.quant.reconstruct`: learned weight rounding and activation
    step sizes, QDrop), starting from the compensated rounding where `compensate_weights` is on;
    it costs calibration time, reported per block. `live_rows` calibrates
    every range, search and compensation on the positions the model's output reads only
    (`edgeport.quant.live`: a padded token's activations drive nothing). `partial_reparam` lets
    each reparameterized layer's output error choose how much of the per-channel scale moves
    into its weight (a 4-bit weight grid suffers from RepQ's full move).
    `rotate_values` rotates each attention head's values and the output projection's matching
    input columns by one Hadamard matrix before anything is calibrated (`edgeport.quant.rotate`:
    exact in float, folded into the weights); `rotate_inputs` rotates the inputs of both layers of
    each GELU FFN and of each attention output projection online by a block Hadamard, float ops
    before its quantizer that no weight can absorb (`edgeport.quant.rotate.RotatedInput`).
    `symmetric` gives every quantizer zero point 0. `layer_widths` gives single layers or
    matmuls (by module path, or the matmul names of the report) their own width, inputs and
    weights alike (a mixed-precision map; a dict is accepted). `float_convs_below_macs`: at W8A8
    for ONNX Runtime, a dense conv doing fewer multiply-adds per sample stays float, where the
    quantize, dequantize and layout changes around an integer island cost more than its kernel
    saves (0, the default, quantizes every dense conv). No one threshold fits every model:
    1_000_000, fitted on FastViT-T8 and EfficientViT-B0 at 64x64, leaves 76 of
    EfficientFormerV2-S0's 85 layers float there (its dense 1x1 convs do 0.37-0.88 M each) and
    the 7 left integer become islands (0.92x fp32, every conv integer 1.27x), while MobileViT-XS,
    whose dense convs of 0.33-0.92 M sit beside depthwise convs and its transformer, measured
    slower with 300_000 than with 1_000_000. `float_grouped_convs` leaves grouped and
    depthwise convs float there too (ORT's integer kernels for them measured 1.2-7x slower than
    its float ones on FastViT-T8; but where they sit between integer convs, as in
    EfficientFormerV2, the float island costs more). `name` and `description` label the config and take no part in
    comparisons.
    """

    w_bits: int = 8
    a_bits: int = 8
    matmul_bits: int | None = None
    weight_granularity: str = "per_channel"
    weight_observer: str = "minmax"
    act_observer: str = "minmax"
    norm_reparam: bool = False
    fold_norm_affine: bool = False
    check_reparam_held_out: bool = False
    migrate_outliers: bool = False
    choose_softmax_quantizer: bool = False
    adalog: bool = False
    compensate_weights: bool = False
    weight_ridge: float | None = None
    damping: float = DAMPING
    recon_iters: int = 0
    live_rows: bool = False
    partial_reparam: bool = False
    rotate_values: bool = False
    rotate_inputs: bool = False
    symmetric: bool = False
    keep_8bit: tuple[str, ...] = ()
    layer_widths: tuple[tuple[str, int], ...] = ()
    float_convs_below_macs: int = 0
    float_grouped_convs: bool = False
    name: str = field(default="custom", compare=False)
    description: str = field(default="", compare=False)

    def __post_init__(self) -> None:
        for bits in (self.w_bits, self.a_bits, self.matmul_operand_bits):
            check_bits(bits)
        if self.weight_granularity not in WEIGHT_GRANULARITIES:
            raise UserError(f"unknown weight granularity {self.weight_granularity!r}; choose one of "
                            f"{', '.join(WEIGHT_GRANULARITIES)}")
        if self.weight_observer not in (*OBSERVERS, AUTO_WEIGHT_OBSERVER):
            raise UserError(f"unknown weight calibration {self.weight_observer!r}; choose one of "
                            f"{', '.join((*OBSERVERS, AUTO_WEIGHT_OBSERVER))}")
        observer(self.act_observer)
        if self.weight_ridge is not None and not (self.compensate_weights and self.weight_ridge > 0):
            raise UserError("weight_ridge is the ridge factor of compensate_weights: a positive number with it")
        if self.recon_iters < 0:
            raise UserError("recon_iters is the number of reconstruction steps per block (0: none)")
        if not self.damping > 0:
            raise UserError(f"damping is the error-feedback rounding's Hessian dampening: a positive number, "
                            f"not {self.damping!r}")
        if self.partial_reparam and self.check_reparam_held_out:
            raise UserError("partial_reparam chooses how much of a per-channel calibration moves into the weight, "
                            "check_reparam_held_out whether to keep it at all: choose one")
        if self.fold_norm_affine and not self.norm_reparam:
            raise UserError("fold_norm_affine moves the LayerNorm reparameterization into the norm: it needs "
                            "norm_reparam")
        # a list would make the frozen config unhashable and unequal to the same names as a tuple
        object.__setattr__(self, "keep_8bit", tuple(self.keep_8bit))
        widths = dict(self.layer_widths)
        for bits in widths.values():
            check_bits(bits)
        object.__setattr__(self, "layer_widths", tuple(sorted(widths.items())))

    @property
    def matmul_operand_bits(self) -> int:
        """The width of activation x activation matmul operands."""
        return self.a_bits if self.matmul_bits is None else self.matmul_bits

    @property
    def weight_axis(self) -> int | None:
        """The weight quantizers' channel axis (None: per tensor)."""
        return WEIGHT_GRANULARITIES[self.weight_granularity]

    @property
    def weight_calibration(self) -> str:
        """The weight observer in effect ("auto" resolved by `w_bits`)."""
        if self.weight_observer != AUTO_WEIGHT_OBSERVER:
            return self.weight_observer
        return "minmax" if self.w_bits >= 8 else "mse"

    @property
    def target(self) -> str:
        """The deployment target whose quantizer form this is ("onnxruntime", "tensorrt")."""
        return next(target for target, symmetric in TARGETS.items() if symmetric == self.symmetric)

    @property
    def has_conv_forms(self) -> bool:
        """Whether CONV_FORMS' float convs apply: for ONNX Runtime's integer kernels, not for
        TensorRT, which times its own kernels when it builds an engine."""
        return self.target == "onnxruntime"

    @property
    def runs_every_width(self) -> bool:
        """Whether the target runs any width a mixed-precision map may choose: ONNX Runtime holds
        narrower grids in INT8; TensorRT runs INT8 activations only."""
        return self.target == "onnxruntime"

    def layer_bits(self, name: str) -> tuple[int, int]:
        """(input bits, weight bits) of the Linear or Conv2d layer at module path `name`."""
        if name in self.keep_8bit:
            return 8, 8
        bits = dict(self.layer_widths).get(name)
        return (self.a_bits, self.w_bits) if bits is None else (bits, bits)

    def matmul_bits_of(self, name: str) -> int:
        """The operand width of the activation x activation matmul called `name`."""
        if name in self.keep_8bit:
            return 8
        return dict(self.layer_widths).get(name, self.matmul_operand_bits)


PRESETS: dict[str, QuantConfig] = {
    "minmax": QuantConfig(name="minmax", description="activation ranges from min and max: the per-tensor baseline"),
    "percentile": QuantConfig(act_observer="percentile", name="percentile",
                              description="activation ranges from the 0.01 and 99.99th percentiles"),
    "repq": QuantConfig(act_observer="mse", weight_observer=AUTO_WEIGHT_OBSERVER, norm_reparam=True,
                        fold_norm_affine=True, migrate_outliers=True, choose_softmax_quantizer=True, name="repq",
                        description="RepQ-ViT: LayerNorm outputs calibrated per channel and reparameterized to per "
                                    "tensor; outlier input channels migrated into weights, ranges and the softmax "
                                    "quantizer chosen by error"),
}
PRESETS["repq-gptq"] = dataclasses.replace(
    PRESETS["repq"], compensate_weights=True, name="repq-gptq",
    description="repq, then each Linear's weight rounded with error feedback from its quantized input (GPTQ)")
PRESETS["erq"] = dataclasses.replace(
    PRESETS["repq-gptq"], weight_ridge=1.0, name="erq",
    description="repq-gptq after a closed-form ridge regression of each Linear's weight and bias onto the float "
                "output from its quantized input (ERQ)")
PRESETS["repq-recon"] = dataclasses.replace(
    PRESETS["repq"], recon_iters=RECON_ITERS, name="repq-recon",
    description=f"repq, then block-wise reconstruction: each transformer block's weight rounding and activation "
                f"step sizes learned against its float output, QDrop-style ({RECON_ITERS} steps a block: costs "
                f"calibration time, minutes on a BERT-small)")
PRESETS["repq-gptq-recon"] = dataclasses.replace(
    PRESETS["repq-recon"], compensate_weights=True, name="repq-gptq-recon",
    description=f"repq-gptq, then repq-recon's block-wise reconstruction starting from its error-feedback "
                f"rounding ({RECON_ITERS} steps a block: costs calibration time): the W8A8 preset for BERT-family "
                f"encoders")

PRESETS["repq-adalog"] = dataclasses.replace(
    PRESETS["repq-gptq"], adalog=True, name="repq-adalog",
    description="repq-gptq with AdaLog (a log quantizer whose base is searched per tensor) for softmax outputs and "
                "post-GELU Linear inputs, each where it beats the uniform grid")
PRESETS["repq-dualclip"] = dataclasses.replace(
    PRESETS["repq-gptq"], act_observer="dualclip", name="repq-dualclip",
    description="repq-gptq with activation ranges from RepQuant's dual clipping: a lower and an upper clip per "
                "channel searched apart")
PRESETS["repq-adalog-dualclip"] = dataclasses.replace(
    PRESETS["repq-adalog"], act_observer="dualclip", name="repq-adalog-dualclip",
    description="repq-adalog with the activation ranges of repq-dualclip")

# the error-feedback rounding's dampening on the live rows alone (see edgeport.quant.erq.DAMPING)
LIVE_DAMPING = 0.3
PRESETS["repq-adalog-live"] = dataclasses.replace(
    PRESETS["repq-adalog"], live_rows=True, weight_observer="clip", partial_reparam=True, damping=LIVE_DAMPING,
    name="repq-adalog-live",
    description="repq-adalog calibrated on the positions the output reads (padding ignored), weights clipped by "
                "search, and the share of RepQ's per-channel scale moved into each weight chosen by its error")
PRESETS["repq-adalog-live-recon"] = dataclasses.replace(
    PRESETS["repq-adalog-live"], rotate_values=True, recon_iters=RECON_ITERS, name="repq-adalog-live-recon",
    description=f"repq-adalog-live on attention values rotated per head (Hadamard, folded into the weights), then "
                f"block-wise reconstruction from its error-feedback rounding ({RECON_ITERS} steps a block, as "
                f"repq-recon: costs calibration time)")
PRESETS["repq-adalog-live-rot"] = dataclasses.replace(
    PRESETS["repq-adalog-live"], rotate_values=True, rotate_inputs=True, name="repq-adalog-live-rot",
    description="repq-adalog-live on attention values rotated per head (folded into the weights) and the inputs of "
                "both FFN layers and each attention output projection rotated online by a block Hadamard "
                "(QuaRot-style: float ops before those quantizers): for 4 and 6 bits")
PRESETS["repq-adalog-live-rot-recon"] = dataclasses.replace(
    PRESETS["repq-adalog-live-rot"], recon_iters=RECON_ITERS, name="repq-adalog-live-rot-recon",
    description=f"repq-adalog-live-rot, then block-wise reconstruction ({RECON_ITERS} steps a block, as repq-recon: "
                f"costs calibration time)")

# erq with the per-channel LayerNorm calibration kept only where it generalizes: on the timm hybrids
# of the quant bench (32 random-normal calibration images, 4-17 tokens per image at 64x64) RepQ's
# per-channel ranges clipped new images (Swin-T held-out cosine 0.9960, 0.9995 in-sample); declined
# there, the regression and the rounding with error feedback make up part of what the per-tensor
# inputs lose. Exported, held-out images: Swin-T 0.9992, DeiT-Ti 0.9995 (repq 0.9993), EfficientViT-B0
# 0.99987 (0.99968), every conv integer; repq-gptq with the same check measured below it on 8 of the 13
# (model, form) pairs held out (above on 4) and on 11 of 13 in-sample
PRESETS["erq-heldout"] = dataclasses.replace(
    PRESETS["erq"], check_reparam_held_out=True, name="erq-heldout",
    description="erq keeping each LayerNorm-fed layer's per-channel calibration only where it beats a per-tensor "
                "input on held-out calibration samples (for vision models calibrated on few images)")


def preset(name: str, **overrides: object) -> QuantConfig:
    """The preset `name` with `overrides` applied: any QuantConfig field by name (w_bits,
    a_bits, act_observer, keep_8bit, ...), and `target` ("onnxruntime" or "tensorrt"), which
    sets `symmetric`. An override of None keeps the preset's value, so callers can pass their
    optional arguments through. Raises UserError naming the presets for an unknown `name`
    and the targets for an unknown `target`."""
    if name not in PRESETS:
        raise UserError(f"unknown quantization method {name!r}; choose one of {', '.join(PRESETS)}")
    target = overrides.pop("target", None)
    if target is not None:
        if target not in TARGETS:
            raise UserError(f"unknown quantization target {target!r}; choose one of {', '.join(TARGETS)}")
        overrides["symmetric"] = TARGETS[target]
    return dataclasses.replace(PRESETS[name], **{key: value for key, value in overrides.items() if value is not None})


def tensorrt_width_caveat(w_bits: int, a_bits: int) -> str | None:
    """What TensorRT will not run of weights of `w_bits` and activations of `a_bits` bits (None
    where it runs them): its quantized kernels take INT8 activations with INT8 or INT4 weights
    (and FP8)."""
    if a_bits == 8 and w_bits in (4, 8):
        return None
    return (f"W{w_bits}A{a_bits} for TensorRT: TensorRT runs INT8 activations with INT8 or INT4 weights (and FP8) "
            f"only; the -tensorrt.onnx keeps the narrower grid in INT8 Q/DQ, so the engine's accuracy is this "
            f"model's but it runs at INT8 speed at best")


def target_caveat(config: QuantConfig) -> str | None:
    """What the deployment target will not run of a quantization meant for it (None where it
    runs all of it); ONNX Runtime runs every width (narrower grids held in INT8)."""
    if config.target != "tensorrt":
        return None
    return tensorrt_width_caveat(config.w_bits, min(config.a_bits, config.matmul_operand_bits))
