"""Real inputs for real models: multi-input calibration (a dict by input name, an .npz through
the CLI), verification on batches of different sequence lengths, and TensorRT intent."""
import json
import re
import warnings

import numpy as np
import pytest
import torch

import edgeport as ep
from edgeport.cli import main
from edgeport.errors import EdgeportWarning
from edgeport.verify import quantization_cost
from hf_models import ARCHITECTURES

FACTORY = '''import sys
sys.path.insert(0, {tests!r})
from hf_models import ARCHITECTURES


def bert():
    return ARCHITECTURES["bert"]()[0]
'''


def token_batch(rows: int, length: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.randint(5, 100, (rows, length), generator=torch.Generator().manual_seed(seed))
    mask = torch.ones_like(ids)
    mask[0, length // 2:] = 0  # one padded row, as a tokenizer pads a short sentence
    return ids, mask


@pytest.fixture
def bert_factory(tmp_path, monkeypatch):
    """`bertmod:bert` importable from the current folder, as a user's own module is."""
    from pathlib import Path

    (tmp_path / "bertmod.py").write_text(FACTORY.format(tests=str(Path(__file__).parent)))
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    return "bertmod:bert"


def test_a_dict_calibration_batch_is_matched_to_the_inputs_by_name():
    model, _ = ARCHITECTURES["bert"]()
    ids, mask = token_batch(8, 16)
    by_name = ep.quantize(model, {"attention_mask": mask.numpy(), "input_ids": ids})
    by_position = ep.quantize(model, (ids, mask))
    with torch.no_grad():
        a, b = by_name(ids, mask).last_hidden_state, by_position(ids, mask).last_hidden_state
    assert torch.equal(a, b)
    with pytest.raises(ep.UserError, match=r"\['ids'\] name no input of the model; its inputs are \['input_ids'"):
        ep.quantize(model, {"ids": ids})
    with pytest.raises(ep.UserError, match="must be the model's first 2 inputs"):
        ep.quantize(model, {"input_ids": ids, "token_type_ids": mask})


def test_batches_of_different_sequence_lengths_verify():
    """Outputs [2, 16, 32] and [2, 19, 32] cannot be stacked; they are judged element by element."""
    model, example = ARCHITECTURES["bert"]()
    qmodel = ep.quantize(model, token_batch(8, 16))
    axes = {"input_ids": {1: "seq"}, "attention_mask": {1: "seq"}}
    import tempfile

    with tempfile.TemporaryDirectory() as folder:
        artifact = ep.export(qmodel, example, out=folder, dynamic_batch=True, dynamic_axes=axes,
                             verify_inputs=[token_batch(2, 16, 1), token_batch(2, 19, 2)])["onnx"]
    assert artifact.parity.passed and artifact.parity.samples == 4
    hidden = next(o for o in artifact.parity.outputs if o.name == "last_hidden_state")
    assert hidden.shape == [4, -1, 32]  # the sequence axis varies between the batches


def test_cli_calibration_npz_by_input_name(bert_factory, tmp_path, capsys):
    ids, mask = token_batch(8, 16)
    np.savez(tmp_path / "calib.npz", attention_mask=mask.numpy(), input_ids=ids.numpy())  # not in forward order
    assert main(["quantize", bert_factory, "--calib", str(tmp_path / "calib.npz"), "-o", str(tmp_path / "out"),
                 "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    artifact = result["artifacts"]["onnx"]
    assert artifact["parity"]["samples"] == 8  # verified on the calibration batch, the example its first row
    assert [s["shape"] for s in artifact["inputs"]] == [[1, 16], [1, 16]]
    # what quantizing cost against the float model: the padded row's last 8 positions left out
    cost = result["against_float"]
    assert cost["samples"] == 8 and "the attention mask keeps" in cost["inputs_source"]
    hidden = next(o for o in cost["outputs"] if o["name"] == "last_hidden_state")
    assert hidden["shape"] == [8 * 16 - 8, 32] and 0.9 < hidden["cosine"] < 1
    assert "accuracy" not in result  # a model outside the zoo: its task is not edgeport's to judge
    np.savez(tmp_path / "wrong.npz", ids=ids.numpy())
    assert main(["quantize", bert_factory, "--calib", str(tmp_path / "wrong.npz"), "-o", str(tmp_path / "out2")]) == 2
    assert "name no input of the model" in capsys.readouterr().err
    assert not (tmp_path / "out2").exists()
    # a mask shorter than its ids: the float BERT runs on it, torch.export would not; refused
    # before any work, in one line without torch's log pages
    np.savez(tmp_path / "short_mask.npz", input_ids=ids.numpy(), attention_mask=mask[:, :8].numpy())
    assert main(["quantize", bert_factory, "--calib", str(tmp_path / "short_mask.npz"), "-o",
                 str(tmp_path / "out3")]) == 2
    err = capsys.readouterr().err
    assert err.splitlines() == ["error: calibration arrays input_ids 8x16, attention_mask 8x8 must have one "
                                "shape, [batch, sequence]: each holds one entry per token"]
    assert not (tmp_path / "out3").exists()


def test_cli_target_tensorrt_writes_the_tensorrt_artifact_and_warns_at_w4a4(tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["quantize", "vit-digits", "--target", "tensorrt", "--w-bits", "4", "--a-bits", "4", "-o",
                 str(out)]) == 0
    captured = capsys.readouterr()
    assert "--target tensorrt also writes the tensorrt target" in captured.err
    assert "warning: W4A4 for TensorRT" in captured.err and "warning" not in captured.out
    assert re.search(r"test accuracy on the zoo's 360 held-out images: float 97\.50 %, quantized \d+\.\d\d % "
                     r"\([+-]\d+\.\d\d points\); their predictions agree on \d+\.\d %", captured.out)
    assert (out / "vit-digits-repq-w4a4-tensorrt.onnx").exists()
    assert (out / "vit-digits-repq-w4a4-tensorrt.trtexec.sh").exists()


def test_cli_quantize_takes_the_export_options(tmp_path, capsys):
    """`edgeport quantize` exports with the backends' options, as `edgeport export` does: here the
    weight type of the ONNX Runtime form, which the artifact's record states."""
    assert main(["quantize", "cnn-digits", "--int8-weights", "unsigned", "-o", str(tmp_path), "--json"]) == 0
    artifact = json.loads(capsys.readouterr().out)["artifacts"]["onnx"]
    assert artifact["settings"]["int8_weights"].startswith("uint8 (asked for): exact on every CPU")
    assert main(["quantize", "cnn-digits", "--int8-weights", "both", "-o", str(tmp_path / "bad")]) == 2
    assert "--int8-weights" in capsys.readouterr().err and not (tmp_path / "bad").exists()


def test_requests_that_cannot_be_met_are_refused_and_a_mixed_map_reports_its_narrowest_width():
    """max_drop picks 4 and 6 bit layers, which TensorRT cannot run, and fastest_form chooses
    among conv forms, which a model without convs lacks: both refused before any work. A
    map's report gives its narrowest width, as the artifact's precision label does."""
    with pytest.raises(ep.UserError, match="TensorRT runs INT8 activations only"):
        ep.quantize("cnn-digits", target="tensorrt", max_drop=0.01)
    with pytest.raises(ep.UserError, match="has no Conv2d"):
        ep.quantize(torch.nn.Sequential(torch.nn.Linear(4, 4)).eval(), torch.randn(8, 4), fastest_form=True)
    qmodel = ep.quantize("cnn-digits", max_drop=0.05)
    narrowest = min(qmodel.mixed_precision.widths.values())
    assert qmodel.quant_report.w_bits == qmodel.quant_report.a_bits == narrowest


def test_a_calibration_sample_of_padding_only_calibrates_and_a_nan_is_refused():
    """A padded batch may hold an empty sentence (its mask all zeros): each of its queries sees
    no key. transformers' attention gives it finite outputs, the quantized attention too (it
    attends uniformly where the float SDPA returns zeros), and no range is fitted to a NaN that
    would spread through the batch. A model that computes NaN from its batch is refused."""
    model, _ = ARCHITECTURES["bert"]()
    ids, mask = token_batch(8, 16)
    mask[7] = 0
    qmodel = ep.quantize(model, (ids, mask))
    with torch.no_grad():
        assert bool(torch.isfinite(qmodel(ids, mask).last_hidden_state).all())

    class Logarithm(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.linear = torch.nn.Linear(4, 4)

        def forward(self, x):
            return self.linear(torch.log(x))

    with pytest.raises(ep.UserError, match="computes NaN or Inf from the calibration data"):
        ep.quantize(Logarithm(), -torch.rand(8, 4))


def test_mixed_precision_and_keep_8bit_say_what_they_cannot_do():
    """max_drop chooses the widths itself (given ones are refused) and warns where even W8A8
    misses the budget, its artifact then named w8a8, not mixed; keep_8bit holds attention
    matmuls at 8 bits as it does Linears, and refuses a name that matches nothing."""
    with pytest.raises(ep.UserError, match="takes no w_bits or a_bits"):
        ep.quantize("cnn-digits", w_bits=6, a_bits=4, max_drop=0.01)
    with pytest.warns(EdgeportWarning, match=r"max_drop 1e-07 is not met even at uniform 8 bits"):
        qmodel = ep.quantize("cnn-digits", max_drop=1e-7)
    assert not qmodel.mixed_precision.met and set(qmodel.mixed_precision.widths.values()) == {8}
    model, _ = ARCHITECTURES["bert"]()
    scores = "encoder.layer.0.attention.self.matmul0"
    qmodel = ep.quantize(model, token_batch(8, 16), w_bits=4, a_bits=4, keep_8bit=[scores])
    assert qmodel.get_submodule(scores).left.bits == 8
    assert qmodel.get_submodule("encoder.layer.0.attention.self.matmul1").left.bits == 4
    with pytest.raises(ep.UserError, match=r"keep_8bit names \['encoder.layer.0.attention.self.matmul9'\]"):
        ep.quantize(model, token_batch(8, 16), keep_8bit=["encoder.layer.0.attention.self.matmul9"])


def test_cli_quantize_exports_dynamic_axes_and_warns_when_the_model_lost_too_much(bert_factory, tmp_path, capsys):
    ids, mask = token_batch(8, 16)
    np.savez(tmp_path / "calib.npz", input_ids=ids.numpy(), attention_mask=mask.numpy())
    assert main(["quantize", bert_factory, "--calib", str(tmp_path / "calib.npz"), "-o", str(tmp_path / "out"),
                 "--dynamic-batch", "--dynamic", "input_ids:1:sequence", "--dynamic", "attention_mask:1:sequence",
                 "--json"]) == 0
    artifact = json.loads(capsys.readouterr().out)["artifacts"]["onnx"]
    assert [spec["shape"] for spec in artifact["inputs"]] == [["batch", "sequence"]] * 2
    assert main(["quantize", "cnn-digits", "--w-bits", "2", "--a-bits", "2", "-o", str(tmp_path / "w2a2")]) == 0
    captured = capsys.readouterr()
    assert "warning: the quantized model misses its width's tolerance against the float model" in captured.err
    assert "FAILED" in captured.out


def test_token_ids_beyond_the_vocabulary_are_refused_by_name(tmp_path):
    """verify and profile name the input and the vocabulary, before torch's IndexError or ONNX
    Runtime's Gather error (an internal error, exit 3, before)."""
    model, example = ARCHITECTURES["bert"]()
    artifact = ep.export(model, example, out=tmp_path)["onnx"]
    ids, mask = example
    wrong = (ids + 200, mask)
    with pytest.raises(ep.UserError, match=r"input 'input_ids' holds token ids from \d+ to \d+; the model's "
                                           r"vocabulary has 128 \(ids 0 to 127\)"):
        ep.verify(artifact.path, model, [wrong])
    with pytest.raises(ep.UserError, match="vocabulary has 128"):
        ep.profile(artifact.path, inputs=[wrong], runs=5, ops=False, energy=False)


def test_sdk_warns_only_where_tensorrt_cannot_run_the_widths():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ep.quantize("cnn-digits", target="tensorrt")
        ep.quantize("cnn-digits", w_bits=4, a_bits=8, target="tensorrt")
        ep.quantize("cnn-digits", w_bits=6, a_bits=6)  # for ONNX Runtime: nothing to warn about
    assert not [w for w in caught if issubclass(w.category, EdgeportWarning)]
    with pytest.warns(EdgeportWarning, match="W6A6 for TensorRT"):
        ep.quantize("cnn-digits", w_bits=6, a_bits=6, target="tensorrt")


def tokens(input_ids: torch.Tensor, mask: torch.Tensor, pad_error: float) -> dict:
    """Per-token outputs, off by `pad_error` at the positions `mask` zeroes."""
    return {"last_hidden_state": input_ids.float().unsqueeze(-1).repeat(1, 1, 4)
            + pad_error * (1 - mask.float()).unsqueeze(-1)}


class MaskedEncoder(torch.nn.Module):
    def __init__(self, pad_error: float):
        super().__init__()
        self.pad_error = pad_error

    def forward(self, input_ids, attention_mask):
        return tokens(input_ids, attention_mask, self.pad_error)


class PaddingEncoder(MaskedEncoder):
    """The same model with its mask under another name."""

    def forward(self, input_ids, padding):
        return tokens(input_ids, padding, self.pad_error)


def test_quantization_cost_judges_token_outputs_on_the_positions_the_mask_keeps():
    """A padded position's output is computed but means nothing: with an `attention_mask`,
    token outputs are judged on the positions it keeps; under any other name every position
    counts, so the same error fails."""
    ids, mask = token_batch(4, 8)
    kept = quantization_cost(MaskedEncoder(0), MaskedEncoder(100), (ids, mask), output_names=["last_hidden_state"])
    assert kept.passed and kept.outputs[0].cosine == pytest.approx(1) and kept.outputs[0].shape == [4 * 8 - 4, 4]
    assert "the attention mask keeps" in kept.inputs_source
    every = quantization_cost(PaddingEncoder(0), PaddingEncoder(100), (ids, mask))
    assert not every.passed and every.outputs[0].shape == [4, 8, 4] and every.outputs[0].name == "output_0"
