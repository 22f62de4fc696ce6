"""The backend registry: backends found by name, options that become SDK keywords and CLI flags,
and every backend's verification blocking a wrong artifact before anything is committed."""
import ast
import dataclasses
import json
from pathlib import Path

import pytest
import torch
from conftest import leftovers

import edgeport as ep
from edgeport.cli import main
from edgeport.export import registry

ROOT = Path(ep.__file__).parent


def test_every_backend_is_found_by_name_and_declares_its_parts():
    assert registry.names() == ["onnx", "coreml", "tensorrt", "nir"]
    for backend in registry.backends():
        assert registry.get(backend.name) is backend
        assert dataclasses.is_dataclass(backend.Options) and backend.summary and backend.quantized
    with pytest.raises(ep.UserError, match="did you mean coreml"):
        registry.get("corml")


def test_every_option_is_an_sdk_keyword_and_a_cli_flag(capsys):
    assert main(["export", "--help"]) == 0
    help_text = capsys.readouterr().out
    fields = registry.option_fields()
    assert {"opset", "exporter", "coreml_precision", "coreml_weights", "tensorrt_precision"} <= set(fields)
    assert fields["opset"].backends == ["onnx", "tensorrt"]
    for entry in fields.values():
        assert entry.flag in help_text


def test_options_are_checked_against_their_declared_range(out):
    with pytest.raises(ep.UserError, match=r"opset \(--opset\) 999 is outside the supported range 13..23"):
        ep.export("cnn-digits", out=out, opset=999)
    with pytest.raises(ep.UserError, match="unknown export option 'coreml_weight'; did you mean coreml_weights"):
        ep.export("cnn-digits", out=out, coreml_weight="int8")
    with pytest.raises(ep.UserError, match=r"opset \(--opset\) takes an integer, not '17'"):
        ep.export("cnn-digits", out=out, opset="17")
    assert leftovers(out) == []
    assert list(ep.export("cnn-digits", out=out, targets="onnx")) == ["onnx"]  # one target as a string, as the CLI


def _string_comparisons(path: Path) -> set[str]:
    """Every string constant that `path` compares something against (==, !=, in, not in)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Compare):
            for operand in [node.left, *node.comparators]:
                elements = operand.elts if isinstance(operand, (ast.Tuple, ast.List, ast.Set)) else [operand]
                found |= {e.value for e in elements if isinstance(e, ast.Constant) and isinstance(e.value, str)}
    return found


def test_sdk_and_cli_never_branch_on_a_backend_name():
    names = {*registry.names(), *(f for b in registry.backends() for f in b.formats), "onnxruntime", "torch"}
    for module in ("sdk.py", "cli.py"):
        assert not _string_comparisons(ROOT / module) & names, module


class SignFlip(torch.nn.Module):
    """A branch on the data: tracing bakes the example's branch in, so the ONNX file computes
    the other sign's inputs wrongly — a real wrong artifact, not a fake."""

    def forward(self, x):
        return x * 2 if x.sum() > 0 else x * -3


def test_a_wrong_onnx_artifact_raises_and_commits_nothing(out):
    example = torch.ones(1, 4)
    batches = [torch.ones(1, 4), -torch.ones(1, 4)]
    with pytest.raises(ep.CheckFailed, match="onnx artifact signflip.onnx fails verification"):
        ep.export(SignFlip(), example, out=out, verify_inputs=batches, exporter="legacy-torchscript")
    assert leftovers(out) == []


@pytest.mark.needs_tensorrt
@pytest.mark.skipif(not __import__("importlib").util.find_spec("tensorrt"),
                    reason="needs the tensorrt package and an NVIDIA GPU (not installable on the dev machines)")
def test_a_wrong_tensorrt_engine_raises_and_commits_nothing(out):
    """A real engine of the sign-flip trace (the other sign's inputs computed wrongly)."""
    with pytest.raises(ep.CheckFailed, match="tensorrt artifact signflip-tensorrt.engine fails verification"):
        ep.export(SignFlip(), torch.ones(1, 4), targets=["tensorrt"], out=out, exporter="legacy-torchscript",
                  verify_inputs=[torch.ones(1, 4), -torch.ones(1, 4)])
    assert leftovers(out) == []


def test_a_wrong_coreml_package_raises_and_commits_nothing(out):
    """Checked by Core ML on macOS and by the MIL interpreter elsewhere: a wrong package fails."""
    with pytest.raises(ep.CheckFailed, match="coreml artifact"):
        ep.export(SignFlip(), torch.ones(1, 4), targets=["coreml"], out=out,
                  verify_inputs=[torch.ones(1, 4), -torch.ones(1, 4)])
    assert leftovers(out) == []


def test_a_target_that_fails_leaves_the_others_committed_and_its_own_files_out(out, capsys):
    """Each target commits on its own: the verified ONNX and Core ML stay, the NIR target that
    really refuses the (non-spiking) CNN leaves nothing, and the failure names the target
    (exit 1 from the CLI)."""
    with pytest.raises(ep.CheckFailed, match="1 of 3 targets failed .nir.") as failed:
        ep.export("cnn-digits", targets=["onnx", "nir", "coreml"], out=out)
    assert sorted(failed.value.results) == ["coreml", "onnx"]
    assert "no spiking neurons" in failed.value.results.failures["nir"]
    assert leftovers(out) == ["cnn-digits.mlpackage", "cnn-digits.mlpackage.edgeport.json", "cnn-digits.onnx",
                              "cnn-digits.onnx.edgeport.json"]
    capsys.readouterr()
    assert main(["export", "cnn-digits", "--to", "nir,onnx", "-o", str(out / "cli"), "--json"]) == 1
    captured = capsys.readouterr()
    assert list(json.loads(captured.out)) == ["onnx", "failed"] and "nir: " in captured.err
