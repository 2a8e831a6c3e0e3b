"""Loading serving predictors without running code that came with the file.

A serving directory may come from elsewhere (copied from another machine, downloaded). Its
manifest's checksums prove that the files are the ones the manifest lists, not who wrote them, so
the loaders must not run code from the files:

- ``torch.load`` runs inside :func:`weights_only_loads`: every ``torch.load`` that torch's own
  loaders make (torch.export's sample inputs, an old-format archive's state dict, pickled weights,
  TorchScript's tensors) is forced to ``weights_only=True`` (tensors and plain containers only;
  torch's ``TORCH_FORCE_WEIGHTS_ONLY_LOAD``), even where torch passes ``weights_only=False``.
- :func:`check_export_archive` reads a torch.export archive's index before torch loads it and
  refuses what would unpickle objects or load compiled code: weights or constants stored as
  pickles (torch.export loads those with ``weights_only=False``), "opaque" constants
  (``pickle.loads``), legacy pickled weight files and AOTInductor code. TorchBind constants (the
  fbgemm lookup's handle) are read by TorchScript's unpickler, which builds only registered C++
  classes and tensors: they are kept.
- :func:`check_program_json` holds the program's text that torch would run to small grammars
  before torch reads it: shape expressions (torch.export hands them to ``sympy.sympify``, an
  ``eval``), input guards (``ExportedProgram.module()`` compiles them with ``exec``) and names (FX
  writes them into the Python code it generates and runs).
- :func:`check_graph` refuses a loaded program whose graph calls anything but operators
  (``torch.ops.*`` overloads, higher-order operators, symbolic-shape arithmetic): torch.export's
  deserializer resolves any ``torch.<attr>...`` name, so a crafted graph could call
  ``torch.os.system``.

An AOTInductor package *is* compiled code (a shared library is loaded), and TorchScript runs its
own interpreter over the file's code: those are only as safe as their source.
"""

from __future__ import annotations

import json
import operator
import os
import re
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from mlet_dist.serving.manifest import ServingError

FORCE = "TORCH_FORCE_WEIGHTS_ONLY_LOAD"
FORCE_NOT = "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD"


@contextmanager
def weights_only_loads() -> Iterator[None]:
    """Within: every ``torch.load`` is ``weights_only=True``, whatever its caller passes."""
    saved = {k: os.environ.get(k) for k in (FORCE, FORCE_NOT)}
    os.environ[FORCE] = "1"
    os.environ.pop(FORCE_NOT, None)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _refuse(path: str | Path, what: str) -> ServingError:
    return ServingError(
        f"refusing to load {path}: {what}, which would run code from the file when loaded; "
        f"mlet-dist collapse never writes that: use a serving directory you collapsed yourself"
    )


def _payload_config(archive: zipfile.ZipFile, name: str, path: str | Path) -> dict[str, Any]:
    try:
        config = json.loads(archive.read(name)).get("config")
    except (ValueError, AttributeError, KeyError) as e:
        raise ServingError(f"cannot load {path}: {name} is not a payload index ({e})") from None
    if not isinstance(config, dict) or not all(isinstance(v, dict) for v in config.values()):
        raise ServingError(f"cannot load {path}: {name} is not a payload index")
    return config


def check_export_archive(path: str | Path) -> None:
    """Refuses a torch.export archive (``.pt2``) with pickled payloads or compiled code.

    Raises:
        ServingError: the file is not a zip archive, or it holds pickled weights/constants,
            opaque (pickled) objects, legacy pickled weight files or AOTInductor code (named).
    """
    try:
        archive = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError) as e:
        raise ServingError(f"cannot load {path}: not a torch.export archive ({e})") from None
    with archive:
        for name in archive.namelist():
            inner = name.split("/", 1)[-1]
            if inner.startswith("data/aotinductor/"):
                raise _refuse(path, f"it holds AOTInductor code ({name})")
            if inner.startswith(("data/weights/", "data/constants/")) and inner.endswith(".pt"):
                raise _refuse(path, f"it holds a pickled legacy payload ({name})")
            if inner.startswith("data/constants/") and "opaque_obj" in inner:
                raise _refuse(path, f"it holds a pickled object ({name})")
            if inner.startswith("models/") and inner.endswith(".json"):
                try:
                    program = json.loads(archive.read(name))
                except ValueError as e:
                    raise ServingError(f"cannot load {path}: {name} is not JSON ({e})") from None
                check_program_json(program, name, path)
            if inner.endswith("_config.json") and inner.startswith(
                ("data/weights/", "data/constants/")
            ):
                for fqn, entry in _payload_config(archive, name, path).items():
                    if entry.get("use_pickle") and not str(entry.get("path_name", "")).startswith(
                        "custom_obj"
                    ):
                        raise _refuse(path, f"its entry {fqn!r} ({name}) is a pickle")
                    if str(entry.get("path_name", "")).startswith("opaque_obj"):
                        raise _refuse(path, f"its entry {fqn!r} ({name}) is a pickled object")


# -- the program's JSON: what torch hands to ``sympy.sympify`` (eval) and to ``exec`` ---------------

_SYMPY_NAMES = frozenset(
    # torch.utils._sympy.functions (the deserializer's sympy_functions), then sympy's own
    "FloorDiv ModularIndexing Where PythonMod Mod CleanDiv CeilToInt FloorToInt CeilDiv LShift "
    "RShift PowByNatural FloatPow FloatTrueDiv IntTrueDiv IsNonOverlappingAndDenseIndicator "
    "TruncToFloat TruncToInt RoundToInt RoundDecimal ToFloat Identity "
    "Symbol Integer Rational Float Add Mul Pow Max Min Abs floor ceiling Eq Ne Lt Le Gt Ge "
    "Equality Unequality StrictLessThan StrictGreaterThan LessThan GreaterThan And Or Not "
    "Piecewise ExprCondPair true false True False oo zoo nan "
    "positive negative integer real nonnegative nonpositive finite infinite even odd zero "
    "nonzero commutative".split()
)
_SYMBOL = re.compile(r"[a-z]+[0-9]+\Z")  # s37, u0: the names torch gives shape symbols
_EXPR_TOKENS = re.compile(
    r"\s*(?:(?P<name>[A-Za-z_][A-Za-z0-9_]*)|'(?P<symbol>[A-Za-z_][A-Za-z0-9_]*)'"
    r"|[0-9]+(?:\.[0-9]+)?(?:[eE][-+]?[0-9]+)?|\*\*|//|==|!=|<=|>=|[-+*/%(),<>=&|~])"
)
_GUARD_TOKENS = re.compile(
    r"\s*(?:L\['[A-Za-z_][A-Za-z0-9_]*'\](?:\.(?:size|stride)\(\)\[[0-9]+\]"
    r"|\.storage_offset\(\))?|[0-9]+|\b(?:and|or|not)\b|\*\*|//|==|!=|<=|>=|[-+*%()<>])"
)
_NAME_KEYS = frozenset(
    "name as_name target fqn buffer_name parameter_name tensor_constant_name custom_obj_name "
    "forward_arg_names class_fqn arg input_name output_name".split()
)
_NAME = re.compile(r"[A-Za-z0-9_.]+\Z")


def _whole(tokens: re.Pattern[str], text: str, names_ok: bool) -> bool:
    """Whether ``text`` is made of ``tokens`` only (and, for sympy, only allowed names)."""
    pos = 0
    while pos < len(text):
        m = tokens.match(text, pos)
        if not m or m.end() == pos:
            return not text[pos:].strip()
        name = m.groupdict().get("name")
        if names_ok and name and name not in _SYMPY_NAMES and not _SYMBOL.match(name):
            return False
        pos = m.end()
    return True


def check_program_json(program: Any, where: str, path: str | Path) -> None:
    """Refuses a torch.export program (the archive's ``models/*.json``) with text torch would run:
    a shape expression (``sympy.sympify`` evaluates it) or guard (``exec``) outside their small
    grammars, a name that is not a dotted identifier (FX writes names into generated code), or a
    line break where code is generated.

    Raises:
        ServingError: naming the key and the text.
    """

    def refuse(key: str, text: str) -> ServingError:
        return _refuse(
            path, f"its program ({where}) has {key} {text[:80]!r}, which torch would run"
        )

    def walk(node: Any, key: str) -> None:
        if isinstance(node, dict):
            for k, v in node.items():
                walk(v, k)
        elif isinstance(node, list):
            for v in node:
                walk(v, key)
        elif isinstance(node, str):
            if "\r" in node or ("\n" in node and key != "stack_trace"):
                raise refuse(key, node)
            if key == "expr_str" and not _whole(_EXPR_TOKENS, node, names_ok=True):
                raise refuse(key, node)
            if key == "guards_code" and not _whole(_GUARD_TOKENS, node, names_ok=False):
                raise refuse(key, node)
            if key in _NAME_KEYS and node and not _NAME.match(node):
                raise refuse(key, node)

    walk(program, "")


def _allowed_targets() -> tuple[set[Any], tuple[type, ...]]:
    import torch
    from torch._export.serde.serialize import _SYM_OPS

    return {*_SYM_OPS, operator.getitem}, (torch._ops.OpOverload, torch._ops.HigherOrderOperator)


def check_graph(program: Any, path: str | Path) -> None:
    """Refuses an ExportedProgram whose graphs call anything but operators.

    Raises:
        ServingError: a node calls a Python function, method or module (named).
    """
    import torch

    functions, operator_types = _allowed_targets()
    for module in program.graph_module.modules():
        if not isinstance(module, torch.fx.GraphModule):
            continue
        for node in module.graph.nodes:
            if node.op in ("placeholder", "output", "get_attr"):
                continue
            target = node.target
            if node.op == "call_function" and (
                isinstance(target, operator_types) or target in functions
            ):
                continue
            raise _refuse(path, f"its graph calls {node.op} {target!r} (node {node.name})")


def load_export(path: str | Path) -> Any:
    """``torch.export.load(path).module()`` after :func:`check_export_archive`, with weights-only
    loads and :func:`check_graph`."""
    import torch

    check_export_archive(path)
    with weights_only_loads():
        program = torch.export.load(str(path))
    check_graph(program, path)
    return program.module()
