"""The trust boundary: tampered model, weight and input files are refused and never run code."""
import io
import json
import os
import pickle
import struct
import subprocess
import sys
import threading
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

import edgeport.core
from edgeport.errors import UserError
from edgeport.load import load_arrays, load_model, load_weights

MIB = 1 << 20


class WritesMarker:
    """A pickle payload that writes `marker` when unpickled with code execution allowed."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.write_text, (self.marker, "x"))


def torch_saved(value) -> bytes:
    buffer = io.BytesIO()
    torch.save(value, buffer)
    return buffer.getvalue()


class Tiny(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(4, 3)
        self.register_buffer("offset", torch.ones(3))

    def forward(self, x):
        return self.lin(x) + self.offset


@pytest.fixture(scope="module")
def genuine(tmp_path_factory) -> Path:
    """A real torch.export.save archive of `Tiny` with a dynamic batch; its zip root is `model/`."""
    path = tmp_path_factory.mktemp("genuine") / "model.pt2"
    torch.manual_seed(0)
    program = torch.export.export(Tiny().eval(), (torch.randn(2, 4),),
                                  dynamic_shapes=({0: torch.export.Dim("batch")},))
    torch.export.save(program, path)
    return path


def root_of(archive: zipfile.ZipFile) -> str:
    return archive.namelist()[0].partition("/")[0]


def rewrite(source: Path, destination: Path, changes: dict[str, bytes | None]) -> Path:
    """A copy of the zip `source` with the entries in `changes` (relative to its root) replaced,
    added, or (None) dropped."""
    with zipfile.ZipFile(source) as original, zipfile.ZipFile(destination, "w") as copy:
        pending = {f"{root_of(original)}/{name}": data for name, data in changes.items()}
        for entry in original.infolist():
            data = pending.pop(entry.filename, original.read(entry.filename))
            if data is not None:
                copy.writestr(entry, data)
        for name, data in pending.items():
            copy.writestr(name, data)
    return destination


def edited_json(archive: Path, name: str, edit) -> bytes:
    """The JSON entry `name` of `archive` after `edit` changed it in place."""
    with zipfile.ZipFile(archive) as original:
        document = json.loads(original.read(f"{root_of(original)}/{name}"))
    edit(document)
    return json.dumps(document).encode()


def add_deflated_zeros(archive: zipfile.ZipFile, name: str, size: int) -> None:
    """An entry of `size` zero bytes that takes a few KiB in the zip, written without holding it."""
    info = zipfile.ZipInfo(name)
    info.compress_type = zipfile.ZIP_DEFLATED
    with archive.open(info, "w") as entry:
        for _ in range(size // MIB):
            entry.write(bytes(MIB))


def test_marker_payload_runs_code_when_unpickled_unsafely(tmp_path):
    """The payload the other tests plant is live: plain pickle.loads writes the marker."""
    marker = tmp_path / "marker"
    pickle.loads(pickle.dumps(WritesMarker(marker)))
    assert marker.exists()


def test_genuine_pt2_loads_with_its_dynamic_batch(genuine):
    model = load_model(genuine)
    x = torch.randn(5, 4)
    expected = x @ model.get_parameter("lin.weight").T + model.get_parameter("lin.bias") + 1
    torch.testing.assert_close(model(x), expected)


@pytest.mark.parametrize("payload", ["code", "tensor"])
def test_pt2_weight_marked_use_pickle_is_refused(genuine, tmp_path, payload):
    marker = tmp_path / "marker"
    data = torch_saved(WritesMarker(marker) if payload == "code" else torch.ones(3, 4))

    def mark_pickled(config):
        config["config"]["lin.weight"]["use_pickle"] = True

    config = "data/weights/model_weights_config.json"
    tampered = rewrite(genuine, tmp_path / "pickled.pt2", {config: edited_json(genuine, config, mark_pickled),
                                                           "data/weights/weight_0": data})
    with pytest.raises(UserError, match=r"data/weights/model_weights_config\.json.*'lin\.weight'.*pickle"):
        load_model(tampered)
    assert not marker.exists()


@pytest.mark.parametrize("stored, use_pickle", [("opaque_obj_0", False), ("custom_obj_0", True), ("tensor_9", True)])
def test_pt2_pickled_constant_is_refused(genuine, tmp_path, stored, use_pickle):
    marker = tmp_path / "marker"

    def add_constant(config):
        config["config"]["planted"] = {"path_name": stored, "is_param": False, "use_pickle": use_pickle,
                                       "tensor_meta": None}

    config = "data/constants/model_constants_config.json"
    payload = pickle.dumps(WritesMarker(marker))
    tampered = rewrite(genuine, tmp_path / "planted.pt2", {config: edited_json(genuine, config, add_constant),
                                                           f"data/constants/{stored}": payload})
    with pytest.raises(UserError, match=rf"model_constants_config\.json.*'planted'.*{stored}"):
        load_model(tampered)
    assert not marker.exists()


def test_pt2_sample_inputs_that_need_code_are_refused(genuine, tmp_path):
    """torch.load's retry with weights_only=False for sample inputs stays weights-only."""
    marker = tmp_path / "marker"
    tampered = rewrite(genuine, tmp_path / "inputs.pt2",
                       {"data/sample_inputs/model.pt": torch_saved(WritesMarker(marker))})
    with pytest.raises(UserError, match="Weights only load failed"):
        load_model(tampered)
    assert not marker.exists()


def test_pt2_with_native_code_is_refused(genuine, tmp_path):
    tampered = rewrite(genuine, tmp_path / "aoti.pt2", {"data/aotinductor/model/model.so": b"\x7fELF"})
    with pytest.raises(UserError, match=r"data/aotinductor/model/model\.so.*native code"):
        load_model(tampered)


def _sympy_exploit(program: dict, marker: Path) -> None:
    program["graph_module"]["graph"]["tensor_values"]["x"]["sizes"][0]["as_expr"]["expr_str"] = (
        f"sympify.__globals__['__builtins__']['exec'](\"__import__('pathlib').Path('{marker}').write_text('x')\")")


def _name_exploit(program: dict, marker: Path) -> None:
    injected = f"x=__import__('pathlib').Path('{marker}').write_text('x')"
    program.update(json.loads(json.dumps(program).replace('"x"', json.dumps(injected))))


def _target_exploit(program: dict, marker: Path) -> None:
    node = program["graph_module"]["graph"]["nodes"][-1]
    node["target"] = "torch.os.system"
    node["inputs"] = [{"name": "command", "arg": {"as_string": f"touch {marker}"}, "kind": 1}]


@pytest.mark.parametrize("exploit", [_sympy_exploit, _name_exploit, _target_exploit],
                         ids=["sympy expression", "placeholder name", "node target"])
def test_pt2_program_text_torch_would_run_is_refused(genuine, tmp_path, exploit):
    """Program JSON that makes torch eval or exec Python of the file's choosing (sympify of a shape
    expression, a name spliced into FX's generated source, a non-operator node target)."""
    marker = tmp_path / "marker"
    program = edited_json(genuine, "models/model.json", lambda document: exploit(document, marker))
    tampered = rewrite(genuine, tmp_path / "program.pt2", {"models/model.json": program})
    with pytest.raises(UserError, match="program.pt2"):
        load_model(tampered)
    assert not marker.exists()


def test_pt2_guards_code_is_never_compiled(genuine, tmp_path):
    """guards_code is Python source that .module() would exec; the model loads without it."""
    marker = tmp_path / "marker"
    program = edited_json(genuine, "models/model.json", lambda document: document.update(
        guards_code=[f"__import__('pathlib').Path('{marker}').write_text('x') or True"]))
    tampered = rewrite(genuine, tmp_path / "guards.pt2", {"models/model.json": program})
    assert load_model(tampered)(torch.randn(2, 4)).shape == (2, 3)
    assert not marker.exists()


@pytest.mark.parametrize("where", ["archive", "sample inputs"])
def test_pt2_zip_bomb_is_refused_before_torch_loads_it(genuine, tmp_path, monkeypatch, where):
    """64 MiB of zeros in under 1 MiB, against a 32 MiB limit: in the archive itself, or in the
    torch.save zip of its sample inputs, which torch would unpack in turn."""
    monkeypatch.setattr(edgeport.core, "MAX_MODEL_BYTES", 32 * MIB)
    tampered = tmp_path / "bomb.pt2"
    if where == "archive":
        rewrite(genuine, tampered, {})
        with zipfile.ZipFile(tampered, "a") as archive:
            add_deflated_zeros(archive, "model/extra/padding", 64 * MIB)
    else:
        nested = io.BytesIO()
        with zipfile.ZipFile(nested, "w") as archive:
            add_deflated_zeros(archive, "archive/data/0", 64 * MIB)
        rewrite(genuine, tampered, {"data/sample_inputs/model.pt": nested.getvalue()})
    assert tampered.stat().st_size < MIB

    def torch_must_not_load(*args, **kwargs):
        raise AssertionError("torch.export.load was reached")

    monkeypatch.setattr(torch.export, "load", torch_must_not_load)
    with pytest.raises(UserError, match=r"over the 32 MiB limit.*EDGEPORT_MAX_MODEL_BYTES"):
        load_model(tampered)


def test_pt2_size_limit_comes_from_the_environment(genuine):
    code = f"from edgeport.load import load_model; load_model({str(genuine)!r})"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                            env={**os.environ, "EDGEPORT_MAX_MODEL_BYTES": "1000"}, cwd=Path(__file__).parents[1])
    assert result.returncode != 0 and "over the 1000 bytes limit" in result.stderr


def test_pt2_tensors_built_from_declared_shapes_count_against_the_limit(genuine, tmp_path):
    """An empty weight record makes torch allocate the declared shape: 4 TiB from a few bytes."""
    def declare_huge(config):
        config["config"]["lin.bias"]["tensor_meta"]["sizes"] = [{"as_int": 1 << 20}, {"as_int": 1 << 20}]

    config = "data/weights/model_weights_config.json"
    tampered = rewrite(genuine, tmp_path / "declared.pt2", {config: edited_json(genuine, config, declare_huge),
                                                            "data/weights/weight_1": b""})
    with pytest.raises(UserError, match="tensors .* declares would take 4.1e\\+03 GiB"):
        load_model(tampered)


def test_pt2_entry_inflating_past_its_declared_size_reads_only_the_declared_bytes(genuine, tmp_path):
    """Why a compression-ratio limit is not needed: torch's reader stops at the declared size.
    weight_0 (3x4 float32, 48 bytes) is replaced by 4 MiB of deflated zeros declared as 48 bytes."""
    tampered = tmp_path / "lying.pt2"
    with zipfile.ZipFile(genuine) as original, zipfile.ZipFile(tampered, "w") as copy:
        for entry in original.infolist():
            if entry.filename.endswith("weight_0"):
                copy.writestr(entry.filename, bytes(4 * MIB), compress_type=zipfile.ZIP_DEFLATED)
            else:
                copy.writestr(entry, original.read(entry))
    raw = bytearray(tampered.read_bytes())
    name = b"model/data/weights/weight_0"
    for signature, name_length_at, size_at, header in ((b"PK\x03\x04", 26, 22, 30), (b"PK\x01\x02", 28, 24, 46)):
        at = raw.find(signature)
        while at != -1:
            name_length = struct.unpack_from("<H", raw, at + name_length_at)[0]
            if raw[at + header:at + header + name_length] == name:
                struct.pack_into("<I", raw, at + size_at, 48)
            at = raw.find(signature, at + 4)
    tampered.write_bytes(raw)
    with zipfile.ZipFile(tampered) as lying:
        assert lying.getinfo(name.decode()).file_size == 48
    assert torch.equal(load_model(tampered).get_parameter("lin.weight"), torch.zeros(3, 4))


def test_broken_pt2_is_one_clean_line_and_no_traceback(genuine, tmp_path):
    """In a fresh interpreter, where torch's logger writes to the real stderr (under pytest it
    would write to pytest's log capture)."""
    broken = {name: tmp_path / f"{name}.pt2" for name in ("empty", "garbage", "not-a-program",
                                                           "missing-weight-record", "bad-json")}
    broken["empty"].write_bytes(b"")
    broken["garbage"].write_bytes(b"PK\x03\x04 not really a zip" * 20)
    with zipfile.ZipFile(broken["not-a-program"], "w") as archive:
        archive.writestr("notes.txt", "hello")
    rewrite(genuine, broken["missing-weight-record"], {"data/weights/weight_0": None})
    rewrite(genuine, broken["bad-json"], {"models/model.json": b"{not json"})
    code = ("import sys\nfrom edgeport.errors import UserError\nfrom edgeport.load import load_model\n"
            "for path in sys.argv[1:]:\n    try:\n        load_model(path)\n"
            "    except UserError as error:\n        print(error)\n")
    result = subprocess.run([sys.executable, "-c", code, *map(str, broken.values())], capture_output=True,
                            text=True, timeout=300, cwd=Path(__file__).parents[1])
    assert result.returncode == 0 and "Traceback" not in result.stderr
    lines = result.stdout.splitlines()
    assert len(lines) == len(broken) and all(f"{name}.pt2" in line for name, line in zip(broken, lines))


@pytest.fixture
def user_module(tmp_path, monkeypatch, request):
    """Writes `<name>.py` into a fresh working directory, as a user's own factory module."""
    monkeypatch.chdir(tmp_path)

    def write(name: str, source: str) -> None:
        (tmp_path / f"{name}.py").write_text(source)
        request.addfinalizer(lambda: sys.modules.pop(name, None))

    return write


FACTORIES = """
import os
import torch
from os import getcwd
from pathlib import Path

class Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = torch.nn.Linear(16, 4)

    def forward(self, x):
        return self.fc(x)

def build():
    return Net()

def not_a_model():
    return [1, 2]

def explodes():
    raise ValueError("the factory failed on purpose\\nsecond line")

print_alias = print
path_class = Path
"""


@pytest.mark.parametrize("spec, message", [
    ("os:abort", "standard library"),
    ("sys:exit", "standard library"),
    ("builtins:print", "standard library"),
    ("os.path:join", "standard library"),
    ("factories_a:getcwd", "builtin_function_or_method"),
    # `print` is a builtin, or Ray's wrapper of it once Ray is imported in the process
    ("factories_a:print_alias", "builtin_function_or_method|not in factories_a"),
    ("factories_a:path_class", "not a model class"),
    ("factories_a:os", "module, not a model class"),
    ("factories_a:nothing", "has no nothing"),
    ("factories_a:not_a_model", "returned a list, not a torch.nn.Module"),
    ("factories_a:explodes", "factories_a:explodes raised ValueError: the factory failed on purpose$"),
    ("no_such_module_xyz:build", "cannot import no_such_module_xyz"),
])
def test_factory_spec_calls_only_a_model_factory_of_the_named_module(user_module, spec, message):
    user_module("factories_a", FACTORIES)
    with pytest.raises(UserError, match=message):
        load_model(spec)


def test_factory_defined_in_another_module_is_refused(user_module):
    user_module("factories_b", FACTORIES)
    user_module("reexports", "from factories_b import build\n")
    with pytest.raises(UserError, match="build is defined in factories_b, not in reexports"):
        load_model("reexports:build")


def test_factory_from_the_working_directory_builds_the_model(user_module):
    user_module("factories_c", FACTORIES)
    path_before = list(sys.path)
    for spec in ("factories_c:build", "factories_c:Net"):
        model = load_model(spec)
        assert isinstance(model, torch.nn.Module) and not model.training
        assert model(torch.randn(2, 16)).shape == (2, 4)
    assert sys.path == path_before


def test_importing_the_named_module_runs_it_which_is_the_contract(user_module, tmp_path):
    """`module:factory` names the user's own code: importing it runs it (and nothing else does)."""
    user_module("announces", f"from pathlib import Path\nPath({str(tmp_path / 'imported')!r}).write_text('x')\n"
                             f"VALUE = 3\n")
    with pytest.raises(UserError, match="int, not a model class"):
        load_model("announces:VALUE")
    assert (tmp_path / "imported").exists()


@pytest.mark.parametrize("how", ["torch.save", "pickle.dump"])
def test_weights_pickle_needing_code_is_refused(tmp_path, how):
    marker, path = tmp_path / "marker", tmp_path / "evil.pt"
    payload = {"weight": WritesMarker(marker)}
    path.write_bytes(torch_saved(payload) if how == "torch.save" else pickle.dumps(payload))
    with pytest.raises(UserError, match="refusing to load"):
        load_weights(path)
    with pytest.raises(UserError, match="refusing to load"):
        load_model(path)
    assert not marker.exists()


def test_weights_zip_bomb_is_refused(tmp_path, monkeypatch):
    monkeypatch.setattr(edgeport.core, "MAX_MODEL_BYTES", 32 * MIB)
    path = tmp_path / "bomb.pt"
    with zipfile.ZipFile(path, "w") as archive:
        add_deflated_zeros(archive, "bomb/data/0", 64 * MIB)
    with pytest.raises(UserError, match="bomb.pt unpacked would take 64 MiB"):
        load_weights(path)


def test_genuine_weights_load(tmp_path):
    path = tmp_path / "state.pt"
    torch.save({"state_dict": {"fc.weight": torch.ones(4, 16)}}, path)
    assert torch.equal(load_weights(path)["fc.weight"], torch.ones(4, 16))


def test_genuine_arrays_load_in_file_order(tmp_path):
    path = tmp_path / "inputs.npz"
    np.savez(path, b=np.ones((2, 3), np.float32), a=np.arange(4))
    arrays = load_arrays(path)
    assert list(arrays) == ["b", "a"] and arrays["a"].tolist() == [0, 1, 2, 3]


def test_arrays_with_pickled_objects_are_refused(tmp_path):
    marker, path = tmp_path / "marker", tmp_path / "evil.npz"
    objects = np.empty(1, dtype=object)
    objects[0] = WritesMarker(marker)
    np.savez(path, x=objects)
    with pytest.raises(UserError, match="evil.npz.*object array"):
        load_arrays(path)
    assert not marker.exists()


def test_arrays_declaring_a_huge_shape_are_refused_before_allocation(tmp_path):
    path = tmp_path / "huge.npz"
    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(header, {"descr": "<f8", "fortran_order": False,
                                                  "shape": (1 << 20, 1 << 20)})
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("x.npy", header.getvalue() + bytes(64))
    with pytest.raises(UserError, match=r"huge\.npz.*'x'.*8\.19e\+03 GiB"):
        load_arrays(path)


def test_arrays_file_with_non_array_members_is_refused(tmp_path):
    path = tmp_path / "odd.npz"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("notes.txt", "hello")
    with pytest.raises(UserError, match="odd.npz holds notes.txt"):
        load_arrays(path)


@pytest.mark.parametrize("kind", ["device", "empty", "folder"])
def test_weights_that_are_no_file_of_data_are_refused_by_what_they_are(tmp_path, kind):
    """A symlink to /dev/zero was reported as missing; an empty file as a bare 'EOFError'."""
    path = tmp_path / "weights.safetensors"
    if kind == "device":
        path.symlink_to("/dev/zero")
    elif kind == "empty":
        path.write_bytes(b"")
    else:
        path.mkdir()
    message = {"device": "is not a regular file", "empty": "is empty", "folder": "is a folder"}[kind]
    with pytest.raises(UserError, match=f"weights file {path} {message}"):
        load_weights(path)


def test_weights_keyed_by_anything_but_names_are_refused(user_module, tmp_path):
    """torch.load accepts {1: tensor}; load_state_dict then failed with an AttributeError (exit 3)."""
    user_module("mymodel", FACTORIES)
    path = tmp_path / "numbered.pt"
    torch.save({"fc.weight": torch.ones(4, 16), 7: torch.ones(4)}, path)
    with pytest.raises(UserError, match="numbered.pt is not a state_dict: .* not 7 \\(int\\)"):
        load_model("mymodel:build", weights=path)


def test_weights_that_do_not_fit_say_which_parameter_and_shapes(user_module, tmp_path):
    """load_state_dict's first line only says 'Error(s) in loading state_dict for Net:'."""
    user_module("mymodel", FACTORIES)
    path = tmp_path / "wrong.pt"
    torch.save({"fc.weight": torch.ones(3, 16), "fc.bias": torch.ones(4)}, path)
    with pytest.raises(UserError) as refused:
        load_model("mymodel:build", weights=path)
    message = str(refused.value)
    assert "\n" not in message and "do not fit mymodel:build" in message
    assert "size mismatch for fc.weight" in message and "torch.Size([3, 16])" in message


def test_arrays_from_a_pipe_are_refused_without_blocking(tmp_path):
    """numpy opens a named pipe and waits for a writer forever."""
    fifo = tmp_path / "inputs.npz"
    os.mkfifo(fifo)
    outcome: list[BaseException | None] = []

    def read() -> None:
        try:
            load_arrays(fifo)
            outcome.append(None)
        except BaseException as error:  # handed to the test's thread
            outcome.append(error)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    reader.join(10)
    if reader.is_alive():  # blocked: a writer releases it, so the run goes on to fail below
        with open(fifo, "wb"):
            pass
        reader.join(10)
    assert len(outcome) == 1 and isinstance(outcome[0], UserError)
    assert f"inputs file {fifo} is not a regular file" in str(outcome[0])
