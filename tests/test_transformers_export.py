"""Models users bring: 17 common `transformers` architectures from small configs.

With the fallback every one must export and verify; Swin needs it (torch.export fails on
one of its views), and BERT-family models need torch.export (the legacy tracer fails).
"""
import pytest

import edgeport as ep
from conftest import leftovers
from hf_models import ARCHITECTURES


@pytest.mark.parametrize("name", sorted(ARCHITECTURES))
def test_architecture_exports_and_verifies(name, out):
    model, example = ARCHITECTURES[name]()
    artifact = ep.export(model, example, out=out)["onnx"]
    assert artifact.parity.passed, artifact.parity.summary()
    assert all(o.max_rel_error <= 1e-4 and o.scale > 0 for o in artifact.parity.outputs)
    if name == "swin":
        assert artifact.exporter == "legacy-torchscript" and "torch.export failed" in artifact.notes[0]


def test_dynamic_batch_and_sequence_on_bert(tmp_path, capsys):
    """The CLI's --dynamic flags make a BERT artifact that runs any batch and sequence length."""
    import numpy as np
    import onnxruntime as ort
    import torch

    model, example = ARCHITECTURES["bert"]()
    axes = {"input_ids": {0: "batch", 1: "sequence"}, "attention_mask": {0: "batch", 1: "sequence"}}
    artifact = ep.export(model, example, out=tmp_path, dynamic_axes=axes)["onnx"]
    assert [i.shape for i in artifact.inputs] == [["batch", "sequence"]] * 2
    ids = np.random.default_rng(0).integers(3, 128, (3, 9))
    mask = np.ones((3, 9), dtype=np.int64)
    hidden = ort.InferenceSession(str(artifact.path)).run(None, {"input_ids": ids, "attention_mask": mask})[0]
    with torch.no_grad():
        expected = model(torch.from_numpy(ids), torch.from_numpy(mask)).last_hidden_state.numpy()
    assert hidden.shape == (3, 9, 32) and np.abs(hidden - expected).max() < 1e-4 * np.abs(expected).max()


def test_cli_dynamic_axis_flag_is_parsed():
    from edgeport.sdk import parse_dynamic

    assert parse_dynamic(["input_ids:1:sequence", "input_ids:0:batch"]) == {"input_ids": {1: "sequence", 0: "batch"}}
    with pytest.raises(ep.UserError, match="is not like"):
        parse_dynamic(["input_ids-1"])


def test_decoder_returning_its_cache_is_refused_in_one_line(out):
    """GPT-2 built as users build it (use_cache defaults to True) returns a DynamicCache that
    neither exporter can write: one line that says what to change, nothing left behind."""
    from hf_models import GPT2, _build, _text_inputs

    model = _build("GPT2Config", "GPT2LMHeadModel", **GPT2)
    with pytest.raises(ep.UserError, match=r"^GPT2LMHeadModel returns a DynamicCache at `cache`, which ONNX cannot "
                                           r"hold \(its key/value cache\): build it with use_cache=False"):
        ep.export(model, _text_inputs()[:1], out=out)
    assert leftovers(out) == []


def test_a_static_mask_beside_dynamic_ids_is_named(out):
    """Only input_ids declared dynamic: the static attention_mask pins the sequence, and the
    refusal names it instead of blaming the model alone."""
    model, example = ARCHITECTURES["bert"]()
    with pytest.raises(ep.UserError, match=r"input_ids axis 1 is always 16 .*static axes of the same size "
                                           r"\(attention_mask axis 1 at 16\).*declare them dynamic too"):
        ep.export(model, example, out=out, dynamic_axes={"input_ids": {1: "sequence"}})
    assert leftovers(out) == []


def test_dynamic_sequence_from_a_one_token_example(out):
    """A decoder exported from a one-token example with a dynamic sequence runs at any length
    (torch.export fixes a size-1 axis, and GPT-2's attention branches on a length of 1)."""
    import numpy as np
    import onnxruntime as ort
    import torch

    model, (ids,) = ARCHITECTURES["gpt2"]()
    artifact = ep.export(model, ids[:, :1], out=out, dynamic_axes={"input_ids": {1: "sequence"}})["onnx"]
    assert artifact.parity.passed and artifact.inputs[0].shape == [2, "sequence"]
    assert artifact.outputs[0].name == "last_hidden_state" and artifact.outputs[0].shape[1] == "sequence"
    session = ort.InferenceSession(str(artifact.path), providers=["CPUExecutionProvider"])
    for length in (1, 9):
        hidden = session.run(None, {"input_ids": ids[:, :length].numpy()})[0]
        with torch.no_grad():
            expected = model(ids[:, :length]).last_hidden_state.numpy()
        assert hidden.shape == (2, length, 32) and np.abs(hidden - expected).max() < 1e-4 * np.abs(expected).max()
