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


def test_gpt2_takes_its_inputs_by_keyword_and_verifies_at_another_length(out):
    """GPT-2's forward takes its cache second and attention_mask third: a dict example passes
    the mask by name, the artifact takes input_ids and attention_mask, verification feeds them
    by name (given batches as dicts, keys in another order, at another length) and the dynamic
    sequence is checked again at a length of its own."""
    import numpy as np
    import onnx
    import onnxruntime as ort
    import torch

    from edgeport.core import source_sha256
    from hf_models import _text_inputs, small_gpt2

    model = small_gpt2()
    ids, mask = _text_inputs(100, 12)
    short_ids, short_mask = _text_inputs(100, 7)
    axes = {"input_ids": {1: "sequence"}, "attention_mask": {1: "sequence"}}
    artifact = ep.export(model, {"input_ids": ids, "attention_mask": mask}, out=out, dynamic_axes=axes,
                         verify_inputs=[{"attention_mask": mask, "input_ids": ids},
                                        {"attention_mask": short_mask, "input_ids": short_ids}])["onnx"]
    assert [(i.name, i.shape) for i in artifact.inputs] == [("input_ids", [2, "sequence"]),
                                                              ("attention_mask", [2, "sequence"])]
    assert artifact.parity.passed and artifact.parity.inputs_source == "given inputs", artifact.parity.summary()
    checked = artifact.settings["verification"]["dynamic_axes"]
    assert "passed" in checked and "sequence=15" in checked, checked
    assert artifact.settings["keyword_inputs"] == ["input_ids", "attention_mask"]
    # the hash is the model's own, in the sidecar and in the file, not the wrapper's
    props = {p.key: p.value for p in onnx.load(str(artifact.path)).metadata_props}
    assert props["edgeport.source_sha256"] == artifact.source_sha256 == source_sha256(model)

    session = ort.InferenceSession(str(artifact.path), providers=["CPUExecutionProvider"])
    ids9, mask9 = _text_inputs(100, 9)
    hidden = session.run(None, {"input_ids": ids9.numpy(), "attention_mask": mask9.numpy()})[0]
    with torch.no_grad():
        expected = model(input_ids=ids9, attention_mask=mask9).last_hidden_state.numpy()
        unmasked = model(input_ids=ids9).last_hidden_state.numpy()
    assert hidden.shape == (2, 9, 32) and np.abs(hidden - expected).max() < 1e-4 * np.abs(expected).max()
    assert np.abs(hidden[1] - unmasked[1]).max() > 1e-3  # the mask reached the graph: padding changes row 1
    # verified again later against the model: it is called by the same names
    assert ep.verify(artifact, model).passed


def test_bert_inputs_in_an_order_of_their_own_and_the_cli_verifies_them_by_name(tmp_path, out, capsys):
    """A dict example in an order other than the forward's (input_ids, attention_mask,
    token_type_ids) names and orders the artifact's inputs as its keys; the CLI, unchanged,
    verifies the artifact against the model from an .npz of arrays by those names."""
    import numpy as np
    import onnxruntime as ort
    import torch

    from edgeport.cli import main
    from hf_models import _text_inputs, small_bert

    model = small_bert()
    ids, mask = _text_inputs(100, 16)
    types = (torch.arange(16) >= 9).long().expand(2, 16).contiguous()  # a second segment from token 9
    example = {"token_type_ids": types, "attention_mask": mask, "input_ids": ids}
    artifact = ep.export(model, example, out=out)["onnx"]
    assert [i.name for i in artifact.inputs] == ["token_type_ids", "attention_mask", "input_ids"]
    assert artifact.parity.passed, artifact.parity.summary()
    session = ort.InferenceSession(str(artifact.path), providers=["CPUExecutionProvider"])
    hidden = session.run(None, {name: value.numpy() for name, value in example.items()})[0]
    with torch.no_grad():
        expected = model(**example).last_hidden_state.numpy()
        one_segment = model(input_ids=ids, attention_mask=mask).last_hidden_state.numpy()
    assert np.abs(hidden - expected).max() < 1e-4 * np.abs(expected).max()
    assert np.abs(hidden - one_segment).max() > 1e-3  # the token types reached the graph

    np.savez(tmp_path / "inputs.npz", **{name: value.numpy() for name, value in example.items()})
    capsys.readouterr()
    assert main(["verify", str(artifact.path), "--against", "hf_models:small_bert",
                 "--inputs", str(tmp_path / "inputs.npz")]) == 0, capsys.readouterr()


def test_keyword_only_inputs_are_named_and_fed_by_name(out):
    """A forward whose inputs are keyword-only takes none by position: a dict example names
    them, and a dynamic batch (checked again at another batch) names them too."""
    from hf_models import KeywordOnlyEncoder, _text_inputs, small_bert

    model = KeywordOnlyEncoder(small_bert()).eval()
    ids, mask = _text_inputs(100, 16)
    artifact = ep.export(model, {"input_ids": ids, "attention_mask": mask}, out=out, dynamic_batch=True)["onnx"]
    assert [(i.name, i.shape) for i in artifact.inputs] == [("input_ids", ["batch", 16]),
                                                              ("attention_mask", ["batch", 16])]
    assert artifact.parity.passed, artifact.parity.summary()
    assert "passed" in artifact.settings["verification"]["dynamic_axes"]


@pytest.mark.parametrize("example, message", [
    (lambda ids, mask: {"input_ids": ids, "attention_masks": mask},
     r"^example input 'attention_masks' names no parameter of GPT2Model\.forward \(its parameters: input_ids, "
     r".*attention_mask, .*\)$"),
    (lambda ids, mask: {}, r"^the example dict is empty: name GPT2Model\.forward's inputs"),
    (lambda ids, mask: {"input_ids": ids, "attention_mask": mask.tolist()},
     r"^example input 'attention_mask' is a list: each value must be a tensor or numpy array$"),
    (lambda ids, mask: {"input_ids": ids, "attention_mask": mask[:, :8].numpy()},
     r"^example arrays input_ids 2x12, attention_mask 2x8 must have one shape, \[batch, sequence\]"),
], ids=["unknown key", "empty", "not a tensor", "per-token shapes differ"])
def test_a_bad_dict_example_is_refused_in_one_line(example, message, out):
    from hf_models import _text_inputs, small_gpt2

    ids, mask = _text_inputs(100, 12)
    with pytest.raises(ep.UserError, match=message) as refused:
        ep.export(small_gpt2(), example(ids, mask), out=out)
    assert "\n" not in str(refused.value) and leftovers(out) == []


def test_verification_dicts_must_name_the_example_dicts_inputs(out):
    from hf_models import _text_inputs, small_gpt2

    ids, mask = _text_inputs(100, 12)
    with pytest.raises(ep.UserError, match=r"^verification arrays \['attention_masks'\] name no input of the model; "
                                           r"its inputs are \['input_ids', 'attention_mask'\]$"):
        ep.export(small_gpt2(), {"input_ids": ids, "attention_mask": mask}, out=out,
                  verify_inputs=[{"input_ids": ids, "attention_masks": mask}])
    assert leftovers(out) == []
