"""The serving artifacts, one entry per kind: its file, its format, how it is built from the serving
model and how it is loaded.

Everything else is derived from this registry: the files ``mlet-dist collapse`` writes and the
manifest lists (``serving.artifacts``, with checksums), the collapse flags that ask for the
optional ones (``--aoti``, ``--torchscript``), the ``mlet-dist predict --predictor`` choices and the
loader :func:`mlet_dist.serving.predict.load_predictor` uses. A new serving format is one
:func:`register` call with its builder and loader (here, or in the code that adds it)::

    register(Artifact(
        kind="mine", path="serving/predictor_mine.pt2", format="...", load_hint="...",
        build=lambda build, path: ..., load=lambda path: ..., flag="--mine", help="also write ...",
    ))

Built in (in this order): ``export`` (``serving/predictor.pt2``, the portable program, always
written with the predictor), ``aoti`` (``serving/predictor_aoti.pt2``: written by default where a
C++ compiler is present, ``--no-aoti`` skips it, ``--aoti`` requires it) and ``torchscript``
(``--torchscript``). ``--predictor auto`` loads the fast default (AOTInductor) when the directory
has it and falls back to the portable program with a one-line note when it does not load.

Why AOTInductor by default: the ExportedProgram runs its graph (~120 aten calls for a DLRM) one
node at a time in Python (``torch.export.load(...).module()`` is an ``fx.GraphModule``): 5-10x
TorchScript's batch-1 latency; the AOTInductor package runs the same program as compiled C++
(benchmarks/results/serving-default_cpu2_2026-12-04.md).

The command line reads this registry for its flags and choices before it imports torch (``--help``
and a refused argument must not wait seconds for torch and TorchRec), so this module imports only
the standard library at its top: each builder and loader imports torch and
:mod:`mlet_dist.serving.predictor` where it runs.
"""

from __future__ import annotations

import io
import logging
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

DEFAULT_KIND = "export"
"""The portable predictor: always written when the collapse writes a predictor."""
AUTO = "auto"
"""``--predictor auto``: the fast default predictor, else the portable one, else the one a directory
has (see ``choose_predictor``)."""
SKIP_ENV = "MLET_DIST_SKIP_ARTIFACTS"
"""Environment variable: comma-separated kinds written by default that collapses in this process
skip (``CollapseOptions.skip``'s default). The test suite sets it to 'aoti' (tests/conftest.py):
an AOTInductor compile is ~10 s per collapse."""


class ServingBuild:
    """What the builders of one serving model share: the model and its torch.export program.

    Args:
        model: the serving model (:class:`mlet_dist.serving.predictor.ServingModel`).
    """

    def __init__(self, model: Any) -> None:
        self.model = model
        self._exported: Any = None

    def exported(self) -> Any:
        """The ``torch.export`` program of the model, traced once (on first use)."""
        if self._exported is None:
            from mlet_dist.serving.predictor import export_predictor

            self._exported = export_predictor(self.model)
        return self._exported


@dataclass(frozen=True)
class Artifact:
    """One kind of serving artifact.

    Attributes:
        kind: its name ('export'): the manifest key and the ``--predictor`` choice.
        path: the file, relative to the serving directory.
        format: what the file is (the manifest's ``format`` text).
        load_hint: how a consumer loads it (the manifest's ``load`` text).
        build: ``build(ServingBuild, path)`` writes the file.
        load: ``load(path)`` -> a callable ``(dense, values, lengths) -> probabilities``.
        flag: the ``mlet-dist collapse`` flag that asks for it; '' = the default predictor, always
            written with the predictor.
        help: the flag's help text.
        check: called before a collapse that asks for it starts (refuses early, e.g. no compiler).
        by_default: written without being asked where ``check`` passes and the build succeeds
            (otherwise the collapse logs a one-line note and writes the others);
            ``--no-<kind>`` skips it, ``flag`` requires it. ``--predictor auto`` prefers it.
    """

    kind: str
    path: str
    format: str
    load_hint: str
    build: Callable[[ServingBuild, Path], None]
    load: Callable[[str], Any]
    flag: str = ""
    help: str = ""
    check: Callable[[], None] | None = None
    by_default: bool = False

    @property
    def optional(self) -> bool:
        return bool(self.flag)

    @property
    def skip_flag(self) -> str:
        """The collapse flag that skips a kind written by default ('' for the others)."""
        return f"--no-{self.kind}" if self.by_default else ""

    def entry(self) -> dict[str, Any]:
        """Its manifest entry (``write_manifest`` adds ``bytes`` and ``sha256``)."""
        return {"path": self.path, "format": self.format, "load": self.load_hint, "device": "cpu"}


ARTIFACTS: dict[str, Artifact] = {}
"""The registered kinds, in the order they are built."""


def register(artifact: Artifact) -> Artifact:
    """Adds a kind to :data:`ARTIFACTS` (built after those registered before it)."""
    if artifact.kind == AUTO or artifact.kind in ARTIFACTS:
        raise ValueError(f"serving artifact kind {artifact.kind!r} is taken")
    if artifact.path in {a.path for a in ARTIFACTS.values()}:
        raise ValueError(f"serving artifact file {artifact.path!r} is taken")
    ARTIFACTS[artifact.kind] = artifact
    return artifact


def optional_artifacts() -> list[Artifact]:
    """The kinds a collapse writes only when asked for (each with its flag), in build order."""
    return [a for a in ARTIFACTS.values() if a.optional]


def default_artifacts() -> list[Artifact]:
    """The optional kinds written without being asked where they can be built (``aoti``)."""
    return [a for a in ARTIFACTS.values() if a.optional and a.by_default]


def skipped_by_environment() -> tuple[str, ...]:
    """The kinds :data:`SKIP_ENV` names (the default of ``CollapseOptions.skip``)."""
    return tuple(k.strip() for k in os.environ.get(SKIP_ENV, "").split(",") if k.strip())


def auto_order(kinds: Iterable[str]) -> list[str]:
    """The known ``kinds`` in the order ``--predictor auto`` tries them: those written by default
    (the fast ones) first, then registry order (the portable program before TorchScript)."""
    there = set(kinds)
    known = [a for a in ARTIFACTS.values() if a.kind in there]
    return [a.kind for a in sorted(known, key=lambda a: not a.by_default)]


def predictor_choices() -> tuple[str, ...]:
    """The ``--predictor`` choices: 'auto' and every kind."""
    return (AUTO, *ARTIFACTS)


def write_serialized(path: Path, save: Callable[[io.BytesIO], Any]) -> None:
    """``save(buffer)`` in memory, then the bytes written atomically by Python
    (:func:`mlet_dist.utils.files.atomic_write`): torch's zip writer aborts the process when the
    disk fills up (a C++ exception in a destructor); a Python write raises ENOSPC, reported as
    :class:`~mlet_dist.utils.files.NoSpaceError` naming ``path``. A failed save or write leaves
    no file at ``path``."""
    from mlet_dist.utils.files import atomic_write

    buffer = io.BytesIO()
    save(buffer)
    atomic_write(path, lambda f: f.write(buffer.getbuffer()))


def write_artifacts(
    model: Any, out: Path, kinds: Iterable[str] = (), skip: Iterable[str] = ()
) -> dict[str, Any]:
    """Writes the portable predictor, the kinds written by default (unless in ``skip``) and the
    optional ``kinds`` of a serving model into ``out``.

    A kind written by default that cannot be built here (no C++ compiler, a lowering failure) is
    left out with a one-line note (logged); one asked for in ``kinds`` is refused instead.

    Returns:
        {"artifacts": {kind: manifest entry}, "signature": the program's inputs and output
        (:func:`mlet_dist.serving.predictor.input_signature`)}.

    Raises:
        AOTIError: 'aoti' was asked for and AOTInductor could not compile the program.
    """
    from mlet_dist.serving.manifest import ServingError
    from mlet_dist.serving.predictor import input_signature

    build, wanted, skipped, entries = ServingBuild(model), set(kinds), set(skip), {}
    for artifact in ARTIFACTS.values():
        asked = not artifact.optional or artifact.kind in wanted
        if not asked and (not artifact.by_default or artifact.kind in skipped):
            continue
        path = out / artifact.path
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            if not asked and artifact.check is not None:
                artifact.check()
            artifact.build(build, path)
        except ServingError as e:  # AOTIError: no compiler, or it could not be compiled
            if asked:
                raise
            path.unlink(missing_ok=True)
            logger.warning(
                "%s not written (%s): serving uses the portable %s; %s skips this note",
                artifact.path,
                str(e).split("; ")[0],
                ARTIFACTS[DEFAULT_KIND].path,
                artifact.skip_flag,
            )
            continue
        entries[artifact.kind] = artifact.entry()
    return {"artifacts": entries, "signature": input_signature(build.exported())}


# -- the built-in kinds ----------------------------------------------------------------------------


def _build_export(build: ServingBuild, path: Path) -> None:
    import torch

    program = build.exported()
    write_serialized(path, lambda f: torch.export.save(program, f))


def _load_export(path: str) -> Any:
    from mlet_dist.serving.safe_load import load_export

    return load_export(path)


def _build_aoti(build: ServingBuild, path: Path) -> None:
    from mlet_dist.serving.predictor import aoti_package

    program = build.exported()
    write_serialized(path, lambda f: aoti_package(program, f))


def _load_aoti(path: str) -> Any:
    import torch

    from mlet_dist.serving.safe_load import weights_only_loads

    with weights_only_loads():  # its shared library is code: only as safe as its source
        return torch._inductor.aoti_load_package(path)


def _check_aoti() -> None:
    from mlet_dist.serving.predictor import check_aoti_available

    check_aoti_available()


def _build_torchscript(build: ServingBuild, path: Path) -> None:
    import torch

    from mlet_dist.serving.predictor import script

    scripted = script(build.model)
    write_serialized(path, lambda f: torch.jit.save(scripted, f))


def _load_torchscript(path: str) -> Any:
    import torch

    from mlet_dist.serving.safe_load import weights_only_loads

    with weights_only_loads():  # TorchScript code runs in its interpreter: trust its source
        return torch.jit.load(path, map_location="cpu")


register(
    Artifact(
        kind="export",
        path="serving/predictor.pt2",
        format="torch.export ExportedProgram (torch.export.save)",
        load_hint="import torch, fbgemm_gpu; model = torch.export.load(path).module()",
        build=_build_export,
        load=_load_export,
    )
)
register(
    Artifact(
        kind="aoti",
        path="serving/predictor_aoti.pt2",
        format="AOTInductor package (torch._inductor.aoti_compile_and_package)",
        load_hint="import torch, fbgemm_gpu; model = torch._inductor.aoti_load_package(path)",
        build=_build_aoti,
        load=_load_aoti,
        flag="--aoti",
        help="require the AOTInductor predictor (serving/predictor_aoti.pt2, written by default "
        "where a C++ compiler is present): refused with the reason if it cannot be compiled",
        check=_check_aoti,
        by_default=True,
    )
)
register(
    Artifact(
        kind="torchscript",
        path="serving/predictor.pt",
        format="TorchScript (torchrec.fx.symbolic_trace + torch.jit.script; deprecated)",
        load_hint="import torch, fbgemm_gpu; model = torch.jit.load(path)",
        build=_build_torchscript,
        load=_load_torchscript,
        flag="--torchscript",
        help="also write the TorchScript predictor serving/predictor.pt (deprecated in torch "
        "2.13; for torchrec.inference's C++ server)",
    )
)
