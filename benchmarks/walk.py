"""How hard is the house to walk? The two walks of issue 22, file by file, and static counts.

``python -m benchmarks.walk --out FILE.md [--json FILE.json]`` measures the checkout it runs in
(the ``mlet_dist`` package on ``sys.path``), in one process, world size 1, gloo:

1. **The training walk**: ``mlet-dist train`` (``mlet_dist.cli.main``) on a tiny config
   (``configs/synthetic_small.toml``, 2 steps, synthetic data generated first by
   ``mlet-dist generate`` into a temporary directory), from the entry to the first ``backward``
   (the loss of the first batch handed to autograd: the first call of ``torch.Tensor.backward``
   or ``torch.autograd.backward``).
2. **The collapse walk**: ``mlet-dist collapse --run RUN --out OUT`` on that run, from the entry
   to the manifest written (the first ``open`` for writing of a file named ``manifest*.json``,
   or a rename onto ``manifest.json``, seen by an audit hook).
3. **Static counts** over the package's source (``ast``): call sites of ``schema_of`` and the
   other re-derivations of a run's facts (``load_run_config``, ``load_config``,
   ``init_distributed``), signatures with a parameter annotated with the whole ``Config``,
   string switches on ``data.source``, public/private twin functions, the largest functions
   and parameter lists, and README.md's length.
4. **Dynamic counts**: how often ``schema_of`` (and the others) actually run in each walk.

Definitions (the counting rules; ``tests/test_walk.py`` checks them on a synthetic package):

- A *project frame* is the frame of a function whose code lives in a file under the package
  directory (``mlet_dist/``). Its *module* is the file's dotted name (``mlet_dist/train/loop.py``
  -> ``mlet_dist.train.loop``). Module bodies (``<module>``, i.e. imports) are not functions
  and are ignored; the package is imported in full before a walk so that no import happens
  inside it. Library code (torch, TorchRec, the standard library) is invisible: a project
  function called from TorchRec code that was called from project module M counts as called
  from M (the reader follows M's call into the library and sees the next project function).
- The *position* is the module of the innermost active project frame (``sys.settrace``
  'call' and 'return' events of the main thread; a generator's resumption is a call, its
  ``yield`` a return, an exception leaving a frame a return).
- A **stop** is a call event into a project function whose module differs from the position
  (the caller's module): the walk enters another file. Calls within one file are not stops,
  so consecutive calls inside a file count once. The entry call (``cli.main``) is the start,
  not a stop.
- A **climb back up** is a return event out of a project frame after which the position is
  another module (the caller's file, which the walk had left): the return crosses a module
  boundary. A return to no project frame (the end of the command) is not a climb.
- Both are counted for **every** event from the entry to the end point, in order: the
  reader's whole path up to the loss (or the manifest), not only the call chain alive at that
  moment. That chain is reported too, as the *depth at the end*: the modules of the active
  project frames at the end point, consecutive repeats collapsed.
- *Loops once*: the same counts after dropping every repetition of a block of events repeated
  identically back to back (a loop over tables or files, TorchRec calling a method of ours once
  per table), recursively (:func:`compress`: from the start of the sequence, at each event the
  block of 1..64 events whose consecutive repeats cover the most events). This is what a reader
  walks: a loop's body once. Both counts are reported; the raw one is the definition above.
- *Distinct stops*: the number of distinct (caller module -> callee module:function) edges
  among the stops, what a reader must learn once, independent of loops and revisits.
- *Depth at the end*: the number of modules on the project stack at the end point.

The path is printed one event a line (``>`` stop: module and function entered, ``<`` climb:
module and function returned into), indented by the module depth of the stack; repeated
blocks of events are printed once with their count.
"""

from __future__ import annotations

import argparse
import ast
import datetime
import importlib
import importlib.metadata
import json
import os
import pkgutil
import platform
import re
import sys
import tempfile
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import CodeType, FrameType
from typing import Any

from benchmarks.common import git_output, machine_info

REPO = Path(__file__).resolve().parents[1]
DEFAULT_CONFIG = REPO / "configs" / "synthetic_small.toml"
# Functions whose calls re-derive a run's facts from its config (static and dynamic counts).
REDERIVATIONS = ("schema_of", "load_run_config", "load_config", "init_distributed")


# -- the walk ------------------------------------------------------------------------------


@dataclass
class Event:
    """One module-crossing event of a walk."""

    kind: str  # "start", "stop" (a call into another module) or "climb" (a return into one)
    module: str  # where the walk is after the event
    function: str  # the function entered (start, stop) or returned into (climb)
    came_from: str  # the module before the event ("" for the start)
    depth: int  # module depth of the project stack after the event (0 = the entry's module)

    def label(self) -> str:
        return f"{self.module}:{self.function}"


@dataclass
class WalkResult:
    """A walk's events up to its end point, its counts, and the calls of the counted names."""

    name: str
    ended: str = ""  # why the walk ended ("" = it never reached its end point)
    events: list[Event] = field(default_factory=list)
    end_chain: list[str] = field(default_factory=list)
    calls_in_walk: dict[str, int] = field(default_factory=dict)
    calls_in_command: dict[str, int] = field(default_factory=dict)
    # module -> the package's modules it imports, directly or not (:func:`import_reach`)
    reach: dict[str, set[str]] = field(default_factory=dict, repr=False)

    @property
    def upward(self) -> list[Event]:
        """Stops against the layering: calls from a module into one that imports it (directly
        or not), i.e. from a lower layer back up into a higher one - only callbacks and closures
        handed down can do that (the import contracts forbid the import itself)."""
        return [
            e
            for e in self.events
            if e.kind == "stop" and e.came_from in self.reach.get(e.module, set())
        ]

    @property
    def stops(self) -> int:
        return sum(e.kind == "stop" for e in self.events)

    @property
    def climbs(self) -> int:
        return sum(e.kind == "climb" for e in self.events)

    @property
    def stops_once(self) -> int:
        """Stops with a loop's repeated crossings counted once (:func:`walked_once`)."""
        return sum(e.kind == "stop" for e in walked_once(self.events))

    @property
    def climbs_once(self) -> int:
        return sum(e.kind == "climb" for e in walked_once(self.events))

    @property
    def distinct_stops(self) -> int:
        return len({(e.came_from, e.module, e.function) for e in self.events if e.kind == "stop"})

    @property
    def modules(self) -> list[str]:
        """The modules the walk visits, in order of the first visit."""
        return list(dict.fromkeys(e.module for e in self.events))

    def summary(self) -> dict[str, Any]:
        return {
            "stops": self.stops,
            "climbs": self.climbs,
            "stops_once": self.stops_once,
            "climbs_once": self.climbs_once,
            "distinct_stops": self.distinct_stops,
            "modules_visited": len(self.modules),
            "depth_at_end": len(self.end_chain),
            "upward_calls": len(self.upward),
            "upward_calls_across_packages": sum(
                e.came_from.rsplit(".", 1)[0] != e.module.rsplit(".", 1)[0] for e in self.upward
            ),
            "upward_calls_once": sum(
                e.kind == "stop" and e.came_from in self.reach.get(e.module, set())
                for e in walked_once(self.events)
            ),
            "ended": self.ended,
        }


class Walker:
    """Follows the project frames of one call (``sys.settrace``) and records its walk.

    Args:
        package_dir: the package's directory; functions in files under it are project code.
        package: the package's dotted name (the module names start with it).
        end_codes: code objects (of any code, library or project) whose first call ends the
            walk: the events after it are not recorded; the call itself goes on, and
            ``count`` names are still counted for the whole command.
        count: function names (``co_name``) of project functions whose calls are counted.
    """

    def __init__(
        self,
        package_dir: Path,
        package: str,
        end_codes: Iterable[CodeType] = (),
        count: Iterable[str] = (),
    ) -> None:
        self.package_dir = str(Path(package_dir).resolve()) + os.sep
        self.package = package
        self.end_codes = set(end_codes)
        self.count = set(count)
        self._modules: dict[CodeType, str | None] = {}
        self._stack: list[tuple[str, str]] = []  # (module, function) of the active project frames
        self._result: WalkResult | None = None
        self._open = False

    def module_of(self, code: CodeType) -> str | None:
        """The dotted module of a project function's code, None for anything else."""
        try:
            return self._modules[code]
        except KeyError:
            pass
        module = None
        filename = os.path.abspath(code.co_filename)
        if code.co_name != "<module>" and filename.startswith(self.package_dir):
            rel = Path(filename[len(self.package_dir) :]).with_suffix("")
            parts = [p for p in rel.parts if p != "__init__"]
            module = ".".join([self.package, *parts])
        self._modules[code] = module
        return module

    def run(self, name: str, fn: Callable[[], Any]) -> tuple[WalkResult, Any]:
        """Runs ``fn()`` traced; returns the walk (up to the end point) and fn's result."""
        self._result = result = WalkResult(name)
        self._stack = []
        self._open = True
        previous = sys.gettrace()
        sys.settrace(self._on_call)
        try:
            value = fn()
        finally:
            sys.settrace(previous)
            self._open = False
        return result, value

    def finish(self, why: str) -> None:
        """Ends the walk now (the end point): later events are not recorded."""
        if not self._open or self._result is None:
            return
        self._open = False
        self._result.ended = why
        self._result.end_chain = _collapse([m for m, _ in self._stack])

    def _depth(self) -> int:
        return len(_collapse([m for m, _ in self._stack])) - 1

    def _on_call(self, frame: FrameType, event: str, arg: Any) -> Any:
        code = frame.f_code
        if self._open and code in self.end_codes:
            self.finish(f"call of {code.co_qualname}")
        module = self.module_of(code)
        if module is None:
            return None
        result = self._result
        assert result is not None
        function = code.co_qualname
        if code.co_name in self.count:
            result.calls_in_command[code.co_name] = result.calls_in_command.get(code.co_name, 0) + 1
            if self._open:
                result.calls_in_walk[code.co_name] = result.calls_in_walk.get(code.co_name, 0) + 1
        caller = self._stack[-1][0] if self._stack else None
        self._stack.append((module, function))
        if self._open and caller != module:  # caller None: the entry (or a new top-level call)
            kind = "start" if caller is None else "stop"
            result.events.append(Event(kind, module, function, caller or "", self._depth()))
        frame.f_trace_lines = False
        return self._on_local

    def _on_local(self, frame: FrameType, event: str, arg: Any) -> Any:
        if event == "return":
            module, _ = self._stack.pop()
            if self._open and self._stack and self._stack[-1][0] != module:
                back, function = self._stack[-1]
                assert self._result is not None
                self._result.events.append(Event("climb", back, function, module, self._depth()))
        return self._on_local


def _collapse(items: list[str]) -> list[str]:
    """Consecutive repeats collapsed: a a b a -> a b a."""
    return [x for i, x in enumerate(items) if i == 0 or items[i - 1] != x]


def compress(items: list[Any], max_block: int = 64) -> list[tuple[list[Any], int]]:
    """Run-length encoding of repeated blocks: ``[(block, times), ...]`` covering ``items``.

    From the start, at each position the block length (1..max_block) whose consecutive
    identical repeats cover the most items is taken (ties: the shorter block); an item that
    starts no repeated block is a block of one, once. Blocks may hold repeats themselves
    (``compress`` them again: a loop inside a loop).
    """
    out: list[tuple[list[Any], int]] = []
    i = 0
    while i < len(items):
        best_len, best_times = 1, 1
        for n in range(1, max_block + 1):
            block = items[i : i + n]
            if len(block) < n:
                break
            times = 1
            while items[i + times * n : i + (times + 1) * n] == block:
                times += 1
            if times > 1 and times * n > best_len * best_times:
                best_len, best_times = n, times
        out.append((items[i : i + best_len], best_times))
        i += best_len * best_times
    return out


def walked_once(events: list[Event]) -> list[Event]:
    """The events with every repetition of a repeated block dropped, recursively: a loop that
    makes the same crossings again and again is walked once."""
    out: list[Event] = []
    for block, times in compress(events):
        out.extend(block if times == 1 else walked_once(block))
    return out


# -- the end point of the collapse: the manifest written ---------------------------------------

_audit_target: list[Callable[[str, tuple[Any, ...]], None]] = []


def _audit(event: str, args: tuple[Any, ...]) -> None:
    if _audit_target:
        _audit_target[-1](event, args)


def _manifest_watch(walker: Walker) -> Callable[[str, tuple[Any, ...]], None]:
    def on_event(event: str, args: tuple[Any, ...]) -> None:
        if event == "open" and len(args) >= 2 and args[0] is not None:
            name = (
                os.path.basename(os.fsdecode(args[0])) if isinstance(args[0], str | bytes) else ""
            )
            mode = args[1] if isinstance(args[1], str) else ""
            if re.fullmatch(r"manifest.*\.json.*", name) and any(c in mode for c in "wxa+"):
                walker.finish(f"manifest written ({name})")
        elif event == "os.rename" and len(args) >= 2 and isinstance(args[1], str | bytes):
            if os.path.basename(os.fsdecode(args[1])) == "manifest.json":
                walker.finish("manifest written (renamed into place)")

    return on_event


# -- the two walks of mlet-dist ------------------------------------------------------------


def import_package(package: str) -> list[str]:
    """Imports every module of ``package`` (so no import happens inside a walk); returns
    those that could not be imported (an optional dependency missing)."""
    root = importlib.import_module(package)
    failed = []
    for info in pkgutil.walk_packages(root.__path__, prefix=f"{package}."):
        if info.name.rsplit(".", 1)[-1] == "__main__":
            continue
        try:
            importlib.import_module(info.name)
        except Exception as e:  # an optional extra: the walk simply never enters it
            failed.append(f"{info.name} ({type(e).__name__})")
    return failed


def import_reach(package_dir: Path, package: str) -> dict[str, set[str]]:
    """For each module of the package, the package's modules it imports directly or through
    others (every import statement of its file, in functions too; ``from a import b`` counts
    ``a.b`` when that is a module)."""
    names: dict[str, Path] = {}
    for path in sorted(package_dir.rglob("*.py")):
        rel = path.relative_to(package_dir).with_suffix("")
        parts = [package, *rel.parts]
        if parts[-1] == "__init__":
            parts = parts[:-1]
        names[".".join(parts)] = path
    direct: dict[str, set[str]] = {}
    for name, path in names.items():
        found = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                found |= {a.name for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                found.add(node.module)
                found |= {f"{node.module}.{a.name}" for a in node.names}
        direct[name] = {m for m in found if m in names and m != name}
    reach: dict[str, set[str]] = {}
    for name in names:
        seen: set[str] = set()
        todo = list(direct[name])
        while todo:
            m = todo.pop()
            if m not in seen:
                seen.add(m)
                todo += direct[m]
        reach[name] = seen - {name}
    return reach


def run_walks(config: Path, rows_per_day: int, workdir: Path) -> dict[str, Any]:
    """Generates tiny data, then walks ``train`` and ``collapse`` in this process."""
    import torch

    import mlet_dist

    failed = import_package("mlet_dist")
    from mlet_dist.cli import main  # the mlet-dist command itself

    package_dir = Path(mlet_dist.__file__).resolve().parent
    data, run, out = workdir / "data", workdir / "run", workdir / "collapsed"
    common = [
        "--config",
        str(config),
        f"--data.dir={data}",
        f"--synthetic.rows_per_day={rows_per_day}",
        "--train.progress=false",
    ]
    quiet = ["--log-level", "WARNING"]
    if main([*quiet, "generate", *common]) != 0:
        raise RuntimeError("mlet-dist generate failed")

    backward = {torch.Tensor.backward.__code__, torch.autograd.backward.__code__}
    walker = Walker(package_dir, "mlet_dist", end_codes=backward, count=REDERIVATIONS)
    train_argv = [*quiet, "train", *common, f"--train.run_dir={run}", "--train.max_steps=2"]
    train_walk, code = walker.run("train", lambda: main(train_argv))
    if code != 0:
        raise RuntimeError(f"mlet-dist train exited with {code}")

    walker = Walker(package_dir, "mlet_dist", count=REDERIVATIONS)
    sys.addaudithook(_audit)  # hooks cannot be removed: _audit dispatches while one is set
    _audit_target.append(_manifest_watch(walker))
    collapse_argv = [*quiet, "collapse", "--run", str(run), "--out", str(out)]
    try:
        collapse_walk, code = walker.run("collapse", lambda: main(collapse_argv))
    finally:
        _audit_target.clear()
    if code != 0:
        raise RuntimeError(f"mlet-dist collapse exited with {code}")
    reach = import_reach(package_dir, "mlet_dist")
    for w in (train_walk, collapse_walk):
        w.reach = reach
    return {
        "package_dir": str(package_dir),
        "not_imported": failed,
        "argv": {"train": train_argv, "collapse": collapse_argv},
        "walks": [train_walk, collapse_walk],
    }


# -- static counts -------------------------------------------------------------------------


@dataclass
class FunctionInfo:
    where: str  # file:qualname
    lines: int
    params: int  # without self/cls


@dataclass
class StaticCounts:
    call_sites: dict[str, dict[str, int]]  # name -> {file: count}
    config_signatures: list[str]  # file:qualname(param, ...) of defs with a whole-Config param
    config_params: int
    source_switches: dict[str, int]  # file -> comparisons of a `.source`/`source` with strings
    source_switch_text: int  # lines matching `source ==` / `source !=` (the count)
    twins: list[str]  # file: f / _f pairs
    functions: list[FunctionInfo]
    files: int
    lines: int

    def total(self, name: str) -> int:
        return sum(self.call_sites.get(name, {}).values())

    def largest(self, n: int = 5) -> list[FunctionInfo]:
        return sorted(self.functions, key=lambda f: (-f.lines, f.where))[:n]

    def most_params(self, n: int = 5) -> list[FunctionInfo]:
        return sorted(self.functions, key=lambda f: (-f.params, f.where))[:n]


_CONFIG = re.compile(r"(?<![\w])Config(?![\w])")


def _annotation_text(node: ast.expr | None) -> str:
    if node is None:
        return ""
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return node.value  # a quoted annotation
    return ast.unparse(node)


def _is_strings(node: ast.expr) -> bool:
    if isinstance(node, ast.Constant):
        return isinstance(node.value, str)
    if isinstance(node, ast.Tuple | ast.List | ast.Set):
        return bool(node.elts) and all(_is_strings(e) for e in node.elts)
    return False


def _is_source(node: ast.expr) -> bool:
    return (isinstance(node, ast.Attribute) and node.attr == "source") or (
        isinstance(node, ast.Name) and node.id == "source"
    )


def _called_name(node: ast.Call) -> str | None:
    if isinstance(node.func, ast.Name):
        return node.func.id
    if isinstance(node.func, ast.Attribute):
        return node.func.attr
    return None


def _functions(tree: ast.AST) -> Iterable[tuple[str, ast.FunctionDef | ast.AsyncFunctionDef]]:
    """Every def with its qualified name (Class.method, outer.<locals>.inner)."""

    def visit(node: ast.AST, prefix: str) -> Iterable[tuple[str, Any]]:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef):
                name = f"{prefix}{child.name}"
                yield name, child
                yield from visit(child, f"{name}.<locals>.")
            elif isinstance(child, ast.ClassDef):
                yield from visit(child, f"{prefix}{child.name}.")
            else:
                yield from visit(child, prefix)

    yield from visit(tree, "")


def static_counts(package_dir: Path, names: Iterable[str] = REDERIVATIONS) -> StaticCounts:
    """The static counts over every ``.py`` file under ``package_dir`` (see the module doc)."""
    names = tuple(names)
    call_sites: dict[str, Counter[str]] = {n: Counter() for n in names}
    signatures, config_params, functions, twins = [], 0, [], []
    switches: Counter[str] = Counter()
    switch_text = files = total_lines = 0
    root = Path(package_dir)
    for path in sorted(root.rglob("*.py")):
        rel = f"{root.name}/{path.relative_to(root).as_posix()}"
        text = path.read_text()
        tree = ast.parse(text, filename=str(path))
        files += 1
        total_lines += len(text.splitlines())
        switch_text += len(re.findall(r"\bsource\s*(?:==|!=)", text))
        for node in ast.walk(tree):
            if isinstance(node, ast.Call) and _called_name(node) in names:
                call_sites[_called_name(node)][rel] += 1  # type: ignore[index]
            elif isinstance(node, ast.Compare):
                sides = [node.left, *node.comparators]
                string_ops = (ast.Eq, ast.NotEq, ast.In, ast.NotIn)
                if all(isinstance(op, string_ops) for op in node.ops) and (
                    any(_is_source(s) for s in sides) and any(_is_strings(s) for s in sides)
                ):
                    switches[rel] += 1
            elif isinstance(node, ast.Match) and _is_source(node.subject):
                switches[rel] += len(node.cases)
        defined = set()
        for qualname, fn in _functions(tree):
            defined.add(qualname)
            a = fn.args
            params = [*a.posonlyargs, *a.args, *a.kwonlyargs]
            params += [p for p in (a.vararg, a.kwarg) if p is not None]
            whole = [p.arg for p in params if _CONFIG.search(_annotation_text(p.annotation))]
            if whole:
                signatures.append(f"{rel}:{qualname}({', '.join(whole)})")
                config_params += len(whole)
            counted = [p for p in params if p.arg not in ("self", "cls")]
            start = min([fn.lineno, *(d.lineno for d in fn.decorator_list)])
            functions.append(
                FunctionInfo(f"{rel}:{qualname}", fn.end_lineno - start + 1, len(counted))
            )
        for qualname in sorted(defined):
            head, _, last = qualname.rpartition(".")
            if last.startswith("_") and not last.startswith("__"):
                public = f"{head}.{last[1:]}" if head else last[1:]
                if public in defined:
                    twins.append(f"{rel}: {public} / {qualname}")
    return StaticCounts(
        call_sites={n: dict(sorted(c.items())) for n, c in call_sites.items()},
        config_signatures=signatures,
        config_params=config_params,
        source_switches=dict(sorted(switches.items())),
        source_switch_text=switch_text,
        twins=twins,
        functions=functions,
        files=files,
        lines=total_lines,
    )


# -- the report ----------------------------------------------------------------------------


def machine() -> dict[str, Any]:
    info = machine_info()
    versions = {"python": platform.python_version()}
    for dist in ("torch", "torchrec", "fbgemm-gpu-cpu", "fbgemm-gpu"):
        try:
            versions[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            pass
    dirty = git_output("status", "--porcelain", "--", "mlet_dist", default="?")
    return {
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "commit": git_output("rev-parse", "--short", "HEAD", default="?")
        + (" (mlet_dist/ modified)" if dirty else ""),
        "package_commit": git_output("log", "-1", "--format=%h", "--", "mlet_dist", default="?"),
        "cpu": info["cpu_model"] or "?",
        "cores": info["cores"],
        "platform": platform.platform(),
        "versions": versions,
    }


def _walk_lines(events: list[Event], indent: str = "") -> list[str]:
    marks = {"start": "=", "stop": ">", "climb": "<"}
    lines = []
    for block, times in compress(events):
        if times == 1:
            e = block[0]
            lines.append(f"{indent}{'  ' * e.depth}{marks[e.kind]} {e.label()}")
        elif len(block) == 1:
            lines.extend(f"{line}   x{times}" for line in _walk_lines(block, indent))
        else:
            lines.append(f"{indent}[ x{times}: the {len(block)} events below, repeated")
            lines.extend(_walk_lines(block, indent + "| "))
            lines.append(f"{indent}]")
    return lines


def report(measured: dict[str, Any] | None, static: StaticCounts, info: dict[str, Any]) -> str:
    """The markdown report."""
    v = info["versions"]
    out = [
        f"# The two walks and the re-derivations of a run (`mlet_dist/` at "
        f"{info['package_commit']}, {info['date']})",
        "",
        f"`python -m benchmarks.walk` on commit {info['commit']} (`mlet_dist/` last changed in "
        f"{info['package_commit']}); {info['cpu']}, "
        f"{info['cores']} cores; {', '.join(f'{k} {x}' for k, x in v.items())}; "
        f"{info['platform']}. Definitions: the docstring of `benchmarks/walk.py`.",
        "",
    ]
    walks: list[WalkResult] = measured["walks"] if measured else []
    if walks:
        out += [
            "## Summary",
            "",
            "| walk | end point | stops | climbs back up | stops, loops once | climbs, loops once "
            "| distinct stops | modules visited | depth at the end | calls back up the layers "
            "(loops once; across packages) | schema_of calls (walk) |",
            "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for w in walks:
            s = w.summary()
            out.append(
                f"| {w.name} | {w.ended or 'NOT REACHED'} | {s['stops']} | {s['climbs']} "
                f"| {s['stops_once']} | {s['climbs_once']} | {s['distinct_stops']} "
                f"| {s['modules_visited']} | {s['depth_at_end']} "
                f"| {s['upward_calls']} ({s['upward_calls_once']}; "
                f"{s['upward_calls_across_packages']}) "
                f"| {w.calls_in_walk.get('schema_of', 0)} |"
            )
        out += [
            "",
            "stops / climbs back up: every module-crossing call / return from the entry to the end "
            "point; loops once: a block of crossings repeated identically (a loop over tables, "
            "files, TorchRec calling back per table) counted once; distinct stops: distinct "
            "(caller module -> module:function) edges; calls back up the layers: stops from a "
            "module into one that imports it (a callback or closure handed down, or a base class "
            "calling its subclass), listed below each walk; across packages: those between two "
            "packages (e.g. utils -> train), not between modules of one package. Definitions: `benchmarks/walk.py`.",
        ]
        out.append("")
    out += [
        "## Static counts (`mlet_dist/`, ast)",
        "",
        f"{static.files} files, {static.lines} lines; README.md: {info['readme_lines']} lines.",
        "",
        "| count | value |",
        "|---|---:|",
    ]
    for name in REDERIVATIONS:
        out.append(
            f"| call sites of `{name}(` (files) | {static.total(name)} "
            f"({len(static.call_sites.get(name, {}))}) |"
        )
    out += [
        f"| signatures with a parameter annotated with the whole `Config` (parameters) "
        f"| {len(static.config_signatures)} ({static.config_params}) |",
        f"| string switches on `source` (ast: `==`/`!=`/`in` against strings, match cases) "
        f"(files) | {sum(static.source_switches.values())} ({len(static.source_switches)}) |",
        f"| lines with `source ==` / `source !=` (text) | {static.source_switch_text} |",
        f"| public/private twin functions (`f` and `_f` in one module) | {len(static.twins)} |",
        f"| largest function (lines) | {static.largest(1)[0].lines} |",
        f"| most parameters | {static.most_params(1)[0].params} |",
        "",
        "Largest functions (lines, with decorators and docstring):",
        "",
        *[f"- {f.lines}: `{f.where}`" for f in static.largest(5)],
        "",
        "Most parameters (without self/cls):",
        "",
        *[f"- {f.params}: `{f.where}`" for f in static.most_params(5)],
        "",
    ]
    for name in REDERIVATIONS:
        sites = static.call_sites.get(name, {})
        out += [f"Call sites of `{name}(`: {static.total(name)} in {len(sites)} files", ""]
        out += [f"- {n}: `{f}`" for f, n in sites.items()] + [""]
    out += [f"Signatures with a whole `Config`: {len(static.config_signatures)}", ""]
    out += [f"- `{s}`" for s in static.config_signatures] + [""]
    out += ["String switches on `source`:", ""]
    out += [f"- {n}: `{f}`" for f, n in static.source_switches.items()] + [""]
    out += ["Twin functions:", ""] + [f"- `{t}`" for t in static.twins] + [""]
    if walks:
        out += ["## Dynamic counts (calls of the function, by name)", ""]
        out += ["| walk | " + " | ".join(f"`{n}`" for n in REDERIVATIONS) + " |"]
        out += ["|---|" + "---:|" * len(REDERIVATIONS)]
        for w in walks:
            cells = [
                f"{w.calls_in_walk.get(n, 0)} / {w.calls_in_command.get(n, 0)}"
                for n in REDERIVATIONS
            ]
            out.append(f"| {w.name} (walk / whole command) | " + " | ".join(cells) + " |")
        out.append("")
        for w in walks:
            argv = " ".join(measured["argv"][w.name])
            out += [
                f"## The {w.name} walk: {w.stops} stops, {w.climbs} climbs back up "
                f"({w.stops_once} and {w.climbs_once} with loops once)",
                "",
                f"`mlet-dist {argv}` (temporary paths), from the entry to the {w.ended or '?'}.",
                "",
                f"Depth at the end ({len(w.end_chain)} modules): "
                + " -> ".join(f"`{m}`" for m in w.end_chain),
                "",
                f"Modules visited ({len(w.modules)}): " + ", ".join(f"`{m}`" for m in w.modules),
                "",
                f"Calls back up the layers ({len(w.upward)}, distinct: "
                + (
                    ", ".join(
                        f"`{a}` -> `{b}`"
                        for a, b in dict.fromkeys((e.came_from, e.label()) for e in w.upward)
                    )
                    or "none"
                )
                + ")",
                "",
                "`=` entry, `>` stop (module:function entered), `<` climb back up (module:function "
                "returned into); indented by module depth.",
                "",
                "```",
                *_walk_lines(w.events),
                "```",
                "",
            ]
        if measured["not_imported"]:
            out += [f"Modules not importable here: {', '.join(measured['not_imported'])}", ""]
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.walk", description=__doc__.split("\n")[0]
    )
    p.add_argument("--out", required=True, help="markdown report")
    p.add_argument("--json", help="also the numbers and events as JSON")
    p.add_argument("--config", default=str(DEFAULT_CONFIG), help="the walks' training config")
    p.add_argument("--rows-per-day", type=int, default=2000, help="synthetic.rows_per_day")
    p.add_argument("--static-only", action="store_true", help="only the static counts")
    args = p.parse_args(argv)

    import mlet_dist

    package_dir = Path(mlet_dist.__file__).resolve().parent
    info = machine()
    readme = package_dir.parent / "README.md"
    info["readme_lines"] = len(readme.read_text().splitlines()) if readme.is_file() else 0
    static = static_counts(package_dir)
    measured = None
    if not args.static_only:
        with tempfile.TemporaryDirectory(prefix="mlet_walk_") as tmp:
            measured = run_walks(Path(args.config).resolve(), args.rows_per_day, Path(tmp))
            for key in ("train", "collapse"):
                measured["argv"][key] = [
                    a.replace(tmp, "TMP").replace(f"{REPO}{os.sep}", "")
                    for a in measured["argv"][key]
                ]
    text = report(measured, static, info)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(text + "\n")
    if args.json:
        data = {"machine": info, "static": asdict(static)}
        if measured:
            data["walks"] = {
                w.name: {**w.summary(), **{k: v for k, v in asdict(w).items() if k != "reach"}}
                for w in measured["walks"]
            }
        Path(args.json).write_text(json.dumps(data, indent=1))
    for w in measured["walks"] if measured else []:
        print(f"{w.name}: {w.summary()} schema_of {w.calls_in_walk.get('schema_of', 0)}")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
