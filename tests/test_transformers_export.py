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
