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

Built in (in this order): ``export`` (``serving/predictor.pt2``, the default, always written with
the predictor), ``aoti`` (``--aoti``) and ``torchscript`` (``--torchscript``).

The command line reads this registry for its flags and choices before it imports torch (``--help``
and a refused argument must not wait seconds for torch and TorchRec), so this module imports only
the standard library at its top: each builder and loader imports torch and
:mod:`mlet_dist.serving.predictor` where it runs.
"""

from __future__ import annotations

import io
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

DEFAULT_KIND = "export"
"""The default predictor: always written when the collapse writes a predictor."""
AUTO = "auto"
"""``--predictor auto``: the default predictor, or the one a directory has (see ``choose_predictor``)."""


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

    @property
    def optional(self) -> bool:
        return bool(self.flag)

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


def predictor_choices() -> tuple[str, ...]:
    """The ``--predictor`` choices: 'auto' and every kind."""
    return (AUTO, *ARTIFACTS)


def write_serialized(path: Path, save: Callable[[io.BytesIO], Any]) -> None:
    """``save(buffer)`` in memory, then the bytes written by Python: torch's zip writer aborts the
    process when the disk fills up (a C++ exception in a destructor); a Python write raises
    ENOSPC, which the collapse reports."""
    buffer = io.BytesIO()
    save(buffer)
    path.write_bytes(buffer.getvalue())


def write_artifacts(model: Any, out: Path, kinds: Iterable[str] = ()) -> dict[str, Any]:
    """Writes the default predictor and the optional ``kinds`` of a serving model into ``out``.

    Returns:
        {"artifacts": {kind: manifest entry}, "signature": the program's inputs and output
        (:func:`mlet_dist.serving.predictor.input_signature`)}.

    Raises:
        AOTIError: 'aoti' was asked for and AOTInductor could not compile the program.
    """
    from mlet_dist.serving.predictor import input_signature

    build, wanted, entries = ServingBuild(model), set(kinds), {}
    for artifact in ARTIFACTS.values():
        if artifact.optional and artifact.kind not in wanted:
            continue
        path = out / artifact.path
        path.parent.mkdir(parents=True, exist_ok=True)
        artifact.build(build, path)
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

    aoti_package(build.exported(), path)


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
        help="also compile the predictor with AOTInductor (serving/predictor_aoti.pt2); refused "
        "with the reason if it cannot be compiled",
        check=_check_aoti,
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
