"""Models users bring: 17 common `transformers` architectures from small configs.

With the fallback every one must export and verify; Swin needs it (torch.export fails on
one of its views), and BERT-family models need torch.export (the legacy tracer fails).
"""
import pytest

import edgeport as ep
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
