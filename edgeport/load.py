"""The trust boundary: everything edgeport reads from a user's files comes in here.

Models (`.pt2` programs, TorchScript archives, `package.module:factory`, zoo names), weights
(safetensors or weights-only torch files) and input arrays (`.npz` without pickles). Nothing
here runs Python code from a file: pickles that need code execution are refused, never loaded,
and a `.pt2` is checked entry by entry before torch reads it. The one Python code that does run
is the module the user names in `module:factory`, which is their own.

TorchScript archives (`.jit`, or a `.pt`/`.pth` that torch.jit.save wrote) are programs, and
accepted as such after a check; see `_check_torchscript_archive` for what torch.jit.load does
with each part and why that check suffices.
"""
from __future__ import annotations

import builtins
import contextlib
import difflib
import importlib
import inspect
import io
import json
import logging
import math
import os
import pickle
import re
import sys
import tokenize
import warnings
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import sympy
import torch
import torch.utils._sympy.functions
from torch.export.pt2_archive import PT2ArchiveReader
from torch.export.pt2_archive.constants import (AOTINDUCTOR_DIR, CONSTANTS_CONFIG_FILENAME_FORMAT, CONSTANTS_DIR,
                                                MODELS_DIR, MODELS_FILENAME_FORMAT, SAMPLE_INPUTS_FILENAME_FORMAT,
                                                TENSOR_CONSTANT_FILENAME_PREFIX, WEIGHTS_CONFIG_FILENAME_FORMAT,
                                                WEIGHTS_DIR)

from edgeport import zoo
from edgeport.core import check_input_size, check_model_size, in_eval_mode
from edgeport.errors import UserError, first_line


def _missing(path: Path) -> str:
    """Why a file the user named cannot be read: absent, a folder, or no regular file at all
    (a device such as /dev/zero, or a pipe, which would be read forever or block)."""
    if path.is_dir():
        return "is a folder, not a file"
    return "is not a regular file (a device, pipe or socket)" if path.exists() else "does not exist"


def _state_dict_mismatch(error: RuntimeError) -> str:
    """load_state_dict's complaint on one line: its first line only says "Error(s) in loading
    state_dict for X:", the keys and shapes that do not fit follow on the next lines."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return "; ".join(lines[1:] or lines)[:300]


def _refuse_pickle(path: Path, error: Exception) -> UserError:
    """The refusal of a pickle that torch's weights-only loader rejected, quoting the
    instruction or global it stopped at (its message around that is advice to unpickle)."""
    advice = ("Weights only load failed", "Please file an issue", "Check the documentation")
    lines = [line.strip() for line in str(error).splitlines() if line.strip() and not line.strip().startswith(advice)]
    reason = lines[0][:160] if lines else first_line(error)[:160]
    return UserError(f"refusing to load {path}: it is a pickle that needs code execution to load "
                     f"(the weights-only loader stopped at: {reason}); save the model with torch.export (.pt2) or "
                     f"give package.module:factory with safetensors or weights-only state_dict")


def _checked_zip_sizes(archive: zipfile.ZipFile, what: str) -> dict[str, int]:
    """Each entry's declared unpacked size, once the total is within the limit and no name repeats.

    Declared sizes are all that needs checking, before anything is read: an entry cannot unpack
    past its declared size. Python's zipfile stops reading there and raises on the CRC; torch's
    reader (miniz) inflates into a buffer of exactly that size and stops (it skips the CRC, so a
    lying entry reads truncated, never larger). A compression ratio limit would add nothing.
    A repeated name is refused because readers disagree on which copy they return.
    """
    entries = archive.infolist()
    sizes = {entry.filename: entry.file_size for entry in entries}
    if len(sizes) != len(entries):
        raise UserError(f"refusing {what}: it holds two zip entries of the same name, the mark of a crafted file")
    check_model_size(f"{what} unpacked", sum(sizes.values()))
    return sizes


# What torch 2.13's torch.export.load does with each entry of a .pt2, a zip whose entries sit under
# one root folder (<m> is a model name; every models/<m>.json is loaded, not only "model"):
#   models/<m>.json                  parsed into the program. Its sympy expressions ("expr_str") go
#                                    through sympify, which is eval, and its names into the Python
#                                    source FX generates and execs: checked by _check_program_strings.
#   data/weights/<m>_weights_config.json, data/constants/<m>_constants_config.json
#                                    how each tensor is stored. Entries marked "use_pickle" go to
#                                    torch.load(weights_only=False), constants named custom_obj_*
#                                    to the TorchScript unpickler and opaque_obj_* to pickle.loads:
#                                    all refused. Tensors whose record is empty are allocated at their
#                                    declared shape: counted against MAX_MODEL_BYTES.
#   data/weights/*, data/constants/tensor_*   raw bytes viewed as tensors, bounds-checked: inert.
#   data/sample_inputs/<m>.pt, and the legacy data/weights/<m>.pt and data/constants/<m>.pt
#                                    torch.load, retried with weights_only=False when the safe load
#                                    fails: TORCH_FORCE_WEIGHTS_ONLY_LOAD keeps the retry weights-only
#                                    (so does any torch.load a later torch adds); each is a zip of its
#                                    own, size-checked like the archive.
#   data/aotinductor/**              native libraries torch would load and run: refused.
#   extra/**, archive_format, .data/*   read as text, never run: inert.
#   guards_code (in the program)     Python source that .module() execs: we build the module with
#                                    check_guards=False, which never compiles it.
#   node targets (in the program)    looked up as attributes of torch, operator or math; torch's
#                                    verifier then refuses any that is not an operator (torch.os.system).
# torch's fallback for archives of torch <= 2.7 would torch.load too, but it needs a top-level
# "version" entry, and torch's reader (which _check_pt2_archive requires to list the archive)
# refuses any entry outside the one root folder.

# Program strings torch only stores, looks up or prints (repr'd or in a comment), never compiles.
_INERT_TEXT_FIELDS = frozenset({"stack_trace", "nn_module_stack", "source_fn_stack", "torch_fn", "custom",
                                "from_node", "as_string", "as_strings", "torch_version", "range_constraints",
                                "guards_code"})
# Program strings that hold JSON of their own (pytree specs), whose names reach generated code.
_NESTED_JSON_FIELDS = frozenset({"in_spec", "out_spec", "context"})
_PLAIN_NAME = re.compile(r"[\w.]*")
_CONTROL_CHARACTER = re.compile(r"[\x00-\x08\x0b-\x1f\x7f]")  # \r would end a generated comment line
_TORCH_SYMBOL = re.compile(r"[a-z]+\d+")  # s0, u1, zuf2: names sympify turns into Symbols
_SYMPY_STRING = re.compile(r"'(?:[A-Za-z_]\w*|[-+]?[\d.]+(?:[eE][-+]?\d+)?)'")  # Symbol('s0'), Float('1.5')
_SYMPY_OPERATORS = frozenset({"(", ")", ",", "=", "-", "+", "*", "/", "**", "//", "%",
                              "<", ">", "<=", ">=", "==", "!="})


def _is_sympy_value(name: str) -> bool:
    for namespace in (sympy, torch.utils._sympy.functions):
        value = vars(namespace).get(name)
        if isinstance(value, sympy.Basic) or (isinstance(value, type) and issubclass(value, sympy.Basic)):
            return True
    return False


def _unsafe_in_sympy_expression(expression: str) -> str | None:
    """What in `expression` could make sympify's eval do more than build sympy objects, if anything.

    Only sympy classes and constants, Symbol-like names, keyword arguments, numbers, simple quoted
    names and arithmetic pass: no attribute access, subscripts, builtins or string tricks.
    """
    try:
        tokens = list(tokenize.generate_tokens(io.StringIO(expression).readline))
    except (tokenize.TokenError, SyntaxError) as error:
        return first_line(error)
    for token, following in zip(tokens, tokens[1:] + tokens[-1:]):
        text = token.string
        if token.type in (tokenize.NEWLINE, tokenize.NL, tokenize.ENDMARKER, tokenize.NUMBER):
            continue
        if token.type == tokenize.NAME and (
                text in ("True", "False", "None") or _is_sympy_value(text) or following.string == "="
                or (_TORCH_SYMBOL.fullmatch(text) and not hasattr(builtins, text))):
            continue
        if token.type == tokenize.STRING and _SYMPY_STRING.fullmatch(text):
            continue
        if token.type == tokenize.OP and text in _SYMPY_OPERATORS:
            continue
        return repr(text)
    return None


def _check_program_strings(value: Any, field: str | None, where: str) -> None:
    """Refuse any string of a program's JSON that torch would compile or eval as more than data.

    Names (values, nodes, parameters, targets, pytree keys) reach the Python source FX generates,
    so they must be plain dotted names; sympy expressions must pass `_unsafe_in_sympy_expression`;
    free text is allowed only in the fields torch merely stores, looks up or prints, and without
    control characters. Unknown fields get the name rule, so text in a field a later torch adds
    is refused rather than trusted.
    """
    inert = field in _INERT_TEXT_FIELDS
    if isinstance(value, dict):
        for key, item in value.items():
            _check_program_strings(key, field if inert else None, where)
            _check_program_strings(item, field if inert else key, where)
    elif isinstance(value, list):
        for item in value:
            _check_program_strings(item, field, where)
    elif isinstance(value, str):
        if inert:
            problem = "a control character" if _CONTROL_CHARACTER.search(value) else None
        elif field == "expr_str":
            problem = _unsafe_in_sympy_expression(value)
        elif field in _NESTED_JSON_FIELDS:
            _check_program_strings(json.loads(value), None, where)
            problem = None
        else:
            problem = None if _PLAIN_NAME.fullmatch(value) else "characters beyond a plain name"
        if problem:
            raise UserError(f"refusing {where}: its {field} {value[:80]!r} holds {problem}; torch would put it "
                            f"in Python code it runs, and torch.export.save never writes such text")


def _read_program_json(path: Path, entry: str, data: bytes) -> Any:
    where = f"{path} entry {entry}"
    try:
        parsed = json.loads(data)
        _check_program_strings(parsed, None, where)
    except (ValueError, RecursionError) as error:
        raise UserError(f"cannot read {where}: {first_line(error)}") from error
    return parsed


def _bytes_built_from_shapes(path: Path, config_entry: str, config: Any, record_sizes: dict[str, int]) -> int:
    """Refuse pickled payloads in a weights or constants config; return the bytes torch will allocate
    from declared shapes alone (tensors whose record is empty)."""
    from torch._export.serde.serialize import deserialize_scalar_type

    directory = CONSTANTS_DIR if config_entry.startswith(CONSTANTS_DIR) else WEIGHTS_DIR
    allocated: dict[str, int] = {}
    try:
        for name, payload in config["config"].items():
            stored = payload["path_name"]
            if payload["use_pickle"] or (directory == CONSTANTS_DIR
                                         and not stored.startswith(TENSOR_CONSTANT_FILENAME_PREFIX)):
                raise UserError(f"refusing {path}: entry {config_entry} stores {name!r} as a pickle "
                                f"({directory}{stored}), which torch would unpickle with code execution")
            if record_sizes.get(directory + stored) == 0 and stored not in allocated:
                shape = [size["as_int"] for size in payload["tensor_meta"]["sizes"]]
                if any(not isinstance(extent, int) or extent < 0 for extent in shape):
                    raise ValueError(f"{name!r} has shape {shape}")
                itemsize = deserialize_scalar_type(payload["tensor_meta"]["dtype"]).itemsize
                allocated[stored] = math.prod(shape) * itemsize
    except (KeyError, TypeError, AttributeError, ValueError) as error:
        raise UserError(f"cannot read {path} entry {config_entry}: malformed ({first_line(error)})") from error
    return sum(allocated.values())


def _check_pt2_archive(path: Path) -> None:
    """Refuse a `.pt2` that torch.export.load would let run code or exhaust memory, before it reads
    anything of it; the table above says why each kind of entry is checked, refused or inert."""
    try:
        with zipfile.ZipFile(path) as archive:
            declared_sizes = _checked_zip_sizes(archive, str(path))
    except (zipfile.BadZipFile, OSError, EOFError) as error:
        raise UserError(f"cannot read {path} as a torch.export program (a .pt2 is a zip): "
                        f"{first_line(error)}") from error
    # Everything below reads through torch's own zip reader, so what is checked is what torch will
    # see; the sizes were checked through Python's, so both must list the same entries.
    try:
        reader = PT2ArchiveReader(str(path))
        record_sizes = {name: reader.archive_file.get_record_size(name) for name in reader.get_file_names()}
    except Exception as error:  # torch's reader raises RuntimeError, AssertionError or ValueError
        raise UserError(f"cannot read {path} as a torch.export program: {first_line(error)}") from error
    if record_sizes != {name.partition("/")[2]: size for name, size in declared_sizes.items()}:
        raise UserError(f"refusing {path}: torch's zip reader lists other entries than Python's, "
                        f"the mark of a crafted archive")

    native_code = next((name for name in record_sizes if name.startswith(AOTINDUCTOR_DIR)), None)
    if native_code:
        raise UserError(f"refusing {path}: entry {native_code} is compiled native code (AOTInductor) that "
                        f"torch would load and run; save the program with plain torch.export.save")
    prefix, suffix = MODELS_FILENAME_FORMAT.split("{}")
    models = {name[len(prefix):-len(suffix)]: name for name in record_sizes if name.startswith(MODELS_DIR)}
    if not models:
        raise UserError(f"{path} holds no exported program (no {MODELS_DIR} entry)")
    allocated = 0
    for model, program_entry in models.items():
        _read_program_json(path, program_entry, reader.read_bytes(program_entry))
        for config_format in (WEIGHTS_CONFIG_FILENAME_FORMAT, CONSTANTS_CONFIG_FILENAME_FORMAT):
            config_entry = config_format.format(model)
            if config_entry in record_sizes:  # absent only in the older layout of pickled weights
                config = _read_program_json(path, config_entry, reader.read_bytes(config_entry))
                allocated += _bytes_built_from_shapes(path, config_entry, config, record_sizes)
        for pickle_entry in (SAMPLE_INPUTS_FILENAME_FORMAT.format(model), f"{WEIGHTS_DIR}{model}.pt",
                             f"{CONSTANTS_DIR}{model}.pt"):
            if pickle_entry in record_sizes:
                try:
                    with zipfile.ZipFile(io.BytesIO(reader.read_bytes(pickle_entry))) as nested:
                        _checked_zip_sizes(nested, f"{path} entry {pickle_entry}")
                except zipfile.BadZipFile as error:
                    raise UserError(f"refusing {path}: entry {pickle_entry} is not a torch.save zip "
                                    f"({first_line(error)})") from error
    check_model_size(f"the tensors {path} declares", allocated)


@contextlib.contextmanager
def _torch_reading_checked_archive() -> Iterator[None]:
    """While torch reads an archive we have checked, every torch.load it makes is weights-only, so a
    pickle we did not foresee still cannot run code, and its export logger, which prints a traceback
    before raising on a broken archive, stays quiet: the error reaches the user as one line. The
    environment is process-wide, so a torch.load in another thread is weights-only meanwhile too."""
    switches = ("TORCH_FORCE_WEIGHTS_ONLY_LOAD", "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD")
    saved_switches = {name: os.environ.pop(name, None) for name in switches}
    os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = "1"
    export_logger = logging.getLogger("torch.export")
    saved_level = export_logger.level
    export_logger.setLevel(logging.CRITICAL + 1)
    try:
        yield
    finally:
        export_logger.setLevel(saved_level)
        for name, value in saved_switches.items():
            os.environ.pop(name, None)
            if value is not None:
                os.environ[name] = value


def _load_program(path: Path) -> torch.nn.Module:
    """The inference module of a checked `.pt2`; every torch error becomes one UserError line."""
    if not path.is_file():
        raise UserError(f"model file {path} {_missing(path)}")
    _check_pt2_archive(path)
    with _torch_reading_checked_archive():
        try:
            # check_guards=False: the guards would be compiled from the file's Python source
            return torch.export.load(str(path)).module(check_guards=False)
        except Exception as error:
            raise UserError(f"cannot read {path} as a torch.export program: {first_line(error)}") from error


@contextlib.contextmanager
def _working_directory_importable() -> Iterator[None]:
    working_directory = os.getcwd()
    sys.path.insert(0, working_directory)
    try:
        yield
    finally:
        sys.path.remove(working_directory)


def _load_factory_model(spec: str) -> torch.nn.Module:
    """The model `package.module:factory` builds; see `load_model` for what may be called."""
    module_name, factory_name = spec.split(":")
    if module_name.partition(".")[0] in sys.stdlib_module_names:
        raise UserError(f"refusing {spec}: {module_name} is Python's standard library, not a model factory; "
                        f"give package.module:factory from your own code")
    with _working_directory_importable():
        try:
            module = importlib.import_module(module_name)
        except Exception as error:
            raise UserError(f"cannot import {module_name} for {spec}: {first_line(error)}") from error
        factory = getattr(module, factory_name, None)
        if factory is None:
            raise UserError(f"cannot resolve {spec}: module {module_name} has no {factory_name}")
        is_model_class = inspect.isclass(factory) and issubclass(factory, torch.nn.Module)
        if not (is_model_class or inspect.isfunction(factory)):
            raise UserError(f"refusing {spec}: {factory_name} is a {type(factory).__name__}, "
                            f"not a model class or a Python function")
        if factory.__module__ != module_name:
            raise UserError(f"refusing {spec}: {factory_name} is defined in {factory.__module__}, not in "
                            f"{module_name}; name the module that defines it")
        try:
            model = factory()
        except Exception as error:
            raise UserError(f"{spec} raised {type(error).__name__}: {first_line(error)}") from error
    if not isinstance(model, torch.nn.Module):
        raise UserError(f"{spec} returned a {type(model).__name__}, not a torch.nn.Module")
    return model


# What torch 2.13's torch.jit.load does with a TorchScript archive (a zip under one root folder),
# read in torch/csrc/jit/serialization/import.cpp and unpickler.cpp: it never calls into Python.
#   data.pkl, constants.pkl     read by TorchScript's own C++ unpickler, which builds tensors,
#                               containers and objects of the classes compiled from code/ only;
#                               a GLOBAL it does not know fails the load (no Python callables).
#   data/*, constants/*         raw tensor storage: inert (sizes checked through the zip).
#   code/**.py, *.debug_pkl     TorchScript source, compiled by the TorchScript compiler (not
#                               Python's), and source ranges for error messages.
# The compiled code runs when the model is called (and a class's __setstate__ while loading), and
# it may call any registered operator: aten::save writes a file, aten::from_file reads one,
# operators of other namespaces do whatever their library does. Those calls are refused before
# torch reads the archive; the rest is tensor arithmetic in the TorchScript interpreter.
TORCHSCRIPT_NAMESPACES = frozenset({"aten", "prim", "quantized"})  # operators TorchScript code may call
TORCHSCRIPT_FILE_OPS = frozenset({"save", "from_file"})  # aten operators that touch the file system
TORCHSCRIPT_SUFFIXES = (".jit", ".pt", ".pth", ".torchscript")


def _is_torchscript_archive(path: Path) -> bool:
    """Whether `path` is a zip written by torch.jit.save (TorchScript code beside the data)."""
    try:
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
    except (zipfile.BadZipFile, OSError):
        return False
    return any(n.partition("/")[2] == "constants.pkl" for n in names) and \
        any(n.partition("/")[2].startswith("code/") for n in names)


def _operator_calls(source: str) -> Iterator[tuple[str, str]]:
    """(namespace, operator) of every `torch.op`, `ops.ns.op` and `torch.ops.ns.op` name in
    TorchScript source (the only ways serialized code calls an operator)."""
    names, current = [], []
    for token in tokenize.generate_tokens(io.StringIO(source).readline):
        if token.type == tokenize.NAME or (token.type == tokenize.OP and token.string == "." and current):
            current.append(token.string)
        else:
            if current:
                names.append("".join(current))
            current = []
    for name in names + ["".join(current)]:
        parts = name.split(".")
        if parts[:2] == ["torch", "ops"]:
            parts = parts[1:]
        if parts[0] == "ops" and len(parts) >= 3:
            yield parts[1], parts[2]
        elif parts[0] == "torch" and len(parts) == 2:
            yield "aten", parts[1]


def _check_torchscript_archive(path: Path) -> None:
    """Refuse a TorchScript archive over the size limit, or whose code calls an operator that
    touches files or lies outside aten/prim/quantized, before torch reads any of it."""
    try:
        with zipfile.ZipFile(path) as archive:
            _checked_zip_sizes(archive, str(path))
            for entry in archive.namelist():
                if entry.partition("/")[2].startswith("code/") and entry.endswith(".py"):
                    source = archive.read(entry).decode("utf-8")
                    for namespace, operator in _operator_calls(source):
                        if namespace not in TORCHSCRIPT_NAMESPACES:
                            problem = "an operator outside aten, prim and quantized"
                        elif namespace == "aten" and operator in TORCHSCRIPT_FILE_OPS:
                            problem = "an operator that touches files"
                        else:
                            continue
                        raise UserError(f"refusing {path}: its TorchScript code ({entry}) calls {namespace}::"
                                        f"{operator}, {problem}; export the model with torch.export (.pt2) instead")
    except (zipfile.BadZipFile, OSError, UnicodeDecodeError, tokenize.TokenError, SyntaxError) as error:
        raise UserError(f"cannot read {path} as a TorchScript archive: {first_line(error)}") from error


def _load_torchscript(path: Path, submodule: str | None) -> torch.nn.Module:
    """A checked TorchScript archive's module (or its `submodule`), whose forward must take
    tensors only: edgeport feeds it tensors, and a stateful wrapper taking settings (Silero's
    `forward(x, sr: int)`) is refused with the submodules that do take tensors."""
    if not path.is_file():
        raise UserError(f"model file {path} {_missing(path)}")
    _check_torchscript_archive(path)
    try:
        module = torch.jit.load(str(path), map_location="cpu")
    except Exception as error:  # torch raises RuntimeError or ValueError for archives it cannot compile
        raise UserError(f"cannot read {path} as a TorchScript archive: {first_line(error)}") from error
    for part in submodule.split(".") if submodule else []:  # ScriptModules have no get_submodule
        children = dict(module.named_children())
        if part not in children:
            raise UserError(f"{path} has no submodule {submodule!r}; the children there are "
                            f"{', '.join(children) or 'none'}")
        module = children[part]
    not_tensors = _non_tensor_arguments(module)
    if not_tensors:
        children = [name for name, child in module.named_children() if not _non_tensor_arguments(child)]
        hint = f"; name a submodule that does, e.g. {path}:{children[0]}" if children else ""
        raise UserError(f"{path}{':' + submodule if submodule else ''}: forward takes {', '.join(not_tensors)}, "
                        f"not only tensors, so it cannot be exported or verified on tensor inputs{hint}")
    return module


def _non_tensor_arguments(module: torch.jit.ScriptModule) -> list[str]:
    """The forward's arguments without a default that are not tensors, as `name: type`."""
    forward = getattr(module, "forward", None)
    if forward is None or not hasattr(forward, "schema"):
        return ["(no TorchScript forward)"]
    tensor = torch._C.TensorType.get()
    return [f"{a.name}: {a.type}" for a in forward.schema.arguments[1:]
            if not a.type.isSubtypeOf(tensor) and not a.has_default_value()]


def _torchscript_spec(text: str) -> tuple[Path, str | None] | None:
    """(archive, submodule) where `text` names a TorchScript archive, as `model.jit` or
    `model.jit:child.path`; None for anything else (a `.pt` of weights, module:factory)."""
    file, _, submodule = text.rpartition(":") if re.fullmatch(r".+\.\w+:[\w.]+", text) else (text, "", "")
    path = Path(file)
    if path.suffix not in TORCHSCRIPT_SUFFIXES or (path.suffix != ".jit" and not _is_torchscript_archive(path)):
        return None
    return path, submodule or None


def load_weights(path: str | Path) -> dict[str, torch.Tensor]:
    """A state_dict from safetensors or a weights-only torch file; never executes pickled code.

    A torch file is a zip whose declared unpacked size must stay within `MAX_MODEL_BYTES`; a
    `{"state_dict": ...}` checkpoint gives its inner state_dict. Anything else, or a pickle
    that needs code to load, is a UserError.
    """
    path = Path(path)
    if not path.is_file():
        raise UserError(f"weights file {path} {_missing(path)}")
    if path.stat().st_size == 0:
        raise UserError(f"weights file {path} is empty")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file
            # safetensors refuses a header whose tensors do not cover the file exactly, so the
            # file's size is what it unpacks to
            check_model_size(f"weights {path}", path.stat().st_size)
            return load_file(path)
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as archive:
                _checked_zip_sizes(archive, str(path))
        with warnings.catch_warnings():  # its note on pickle protocols is noise before a refusal
            warnings.simplefilter("ignore")
            state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        raise _refuse_pickle(path, error) from error
    except UserError:
        raise
    except Exception as error:
        raise UserError(f"cannot read weights {path}: {first_line(error)}") from error
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise UserError(f"{path} holds a {type(state).__name__}, not a state_dict of tensors")
    not_names = [key for key in state if not isinstance(key, str)]
    if not_names:  # load_state_dict would fail on them with an AttributeError, not a message
        raise UserError(f"{path} is not a state_dict: its keys must be parameter names, not {not_names[0]!r} "
                        f"({type(not_names[0]).__name__})")
    return state


def load_model(spec: str | torch.nn.Module, weights: str | Path | None = None) -> torch.nn.Module:
    """Resolve a model given as a module, zoo name, `.pt2` file, `.nir` graph or `package.module:factory`.

    A `.nir` file (NIR, the neuromorphic exchange format of snnTorch, Norse, Sinabs, Rockpool
    and others) is read by `nir.read`, HDF5 arrays and strings only, into a stepped torch
    model (`edgeport.export.nir.NirGraphModel`) that exports in the spiking forms.

    A `.pt2` is checked before torch reads it (no pickles, native code or text torch would run as
    Python; sizes within `MAX_MODEL_BYTES`). A TorchScript archive (`model.jit`, or a `.pt`/`.pth`
    that torch.jit.save wrote; `model.jit:child` for one of its submodules) is checked too (no
    operator that touches files) and comes back as a ScriptModule whose forward takes tensors. For `package.module:factory` the current working
    directory comes first on `sys.path` while the module is imported and the factory runs, so
    `mymod:build` finds ./mymod.py as `python -m` would; importing runs that module (it is the
    user's own code), but only a model class or a plain function defined in that very module is
    called, never a builtin, a re-export or the standard library, and it must return a module.
    `weights` (safetensors or a weights-only torch file) are loaded into it; the model comes back
    in eval mode.
    """
    if isinstance(spec, torch.nn.Module):
        return in_eval_mode(spec)
    if isinstance(spec, torch.export.ExportedProgram):
        return spec.module()  # already in inference form; it refuses .eval()
    text = str(spec)
    path = Path(text)
    if text in zoo.names():
        model = zoo.load(text)
    elif path.suffix == ".pt2":
        if weights is not None:
            raise UserError("a .pt2 file carries its own weights; drop --weights")
        return _load_program(path)  # already in inference form; it refuses .eval()
    elif path.suffix == ".nir":  # HDF5 of arrays and strings: nir.read unpickles and runs nothing
        if weights is not None:
            raise UserError("a .nir file carries its own weights; drop --weights")
        from edgeport.export.nir import read_graph_model

        if not path.is_file():
            raise UserError(f"model file {path} {_missing(path)}")
        return read_graph_model(path)  # its HDF5 checked before it is read (nir._check_nir_file)
    elif _torchscript_spec(text) is not None:
        if weights is not None:
            raise UserError("a TorchScript archive carries its own weights; drop --weights")
        return in_eval_mode(_load_torchscript(*_torchscript_spec(text)))
    elif re.fullmatch(r"[\w.]+:\w+", text):
        model = _load_factory_model(text)
    elif path.suffix in (".pt", ".pth", ".bin", ".pkl", ".ckpt"):
        if not path.is_file():
            raise UserError(f"model file {path} {_missing(path)}")
        load_weights(path)  # refuses code-executing pickles; a plain state_dict passes
        raise UserError(f"{path} holds weights, not a model: give the architecture as "
                        f"package.module:factory with --weights {path}, or export a .pt2")
    else:
        close = difflib.get_close_matches(text, zoo.names(), n=2)
        hint = f"did you mean {', '.join(close)}? " if close else ""
        raise UserError(f"cannot resolve model {text!r}: {hint}give a zoo name ({', '.join(zoo.names())}), "
                        f"a .pt2 file, or package.module:factory")
    if weights is not None:
        try:
            model.load_state_dict(load_weights(weights))
        except RuntimeError as error:
            raise UserError(f"weights {weights} do not fit {text}: {_state_dict_mismatch(error)}") from error
    return in_eval_mode(model)


def load_arrays(path: str | Path) -> dict[str, np.ndarray]:
    """The arrays of an `.npz` file by name, in file order.

    Every member's header is read first: object (pickled) arrays are refused, and so is any array
    whose declared shape would take more than `edgeport.core.MAX_INPUT_BYTES`, before numpy
    allocates it. Members that are not `.npy` arrays are refused too, as numpy would read them whole.
    """
    path = Path(path)
    if not path.is_file():  # a pipe would block the read forever
        raise UserError(f"inputs file {path} {_missing(path)}")
    try:
        with zipfile.ZipFile(path) as archive:
            for member in archive.infolist():
                name = member.filename.removesuffix(".npy")
                if name == member.filename:
                    raise UserError(f"{path} holds {member.filename}, which is not an .npy array")
                with archive.open(member) as stream:
                    version = np.lib.format.read_magic(stream)
                    read_header = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                                   else np.lib.format.read_array_header_2_0)
                    shape, _, dtype = read_header(stream)
                if dtype.hasobject:
                    raise UserError(f"refusing {path}: array {name!r} is an object array, a pickle that needs "
                                    f"code execution to load; save plain numeric arrays")
                try:
                    check_input_size(name, shape, dtype)
                except UserError as error:
                    raise UserError(f"refusing {path}: {error}") from error
        with np.load(path, allow_pickle=False) as data:
            arrays = {k: data[k] for k in data.files}
    except UserError:
        raise
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as error:
        raise UserError(f"cannot read inputs {path}: {first_line(error)}") from error
    if not arrays:
        raise UserError(f"{path} holds no arrays")
    return arrays
