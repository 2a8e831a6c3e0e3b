"""Loading a checkpoint without executing code.

DCP's pickled ``.metadata`` is read by an unpickler that allows only DCP's metadata classes, torch
sizes and dtypes (:class:`SafeFileSystemReader`), and non-tensor values are read with
``torch.load(weights_only=True)`` (:class:`SafeLoadPlanner`); :func:`dcp_load` uses both. A file
that asks for anything else (e.g. ``os.system``) is refused with a :class:`CheckpointError`.
"""

from __future__ import annotations

import io
import pathlib
import pickle
import re
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import DefaultLoadPlanner, FileSystemReader
from torch.distributed.checkpoint import filesystem as dcp_filesystem
from torch.distributed.checkpoint import metadata as dcp_metadata
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta

from mlet_dist.checkpoint.layout import CheckpointError

_TORCH_DTYPES = frozenset(n for n, v in vars(torch).items() if isinstance(v, torch.dtype))


def qualified_names(*objects: Any) -> set[tuple[str, str]]:
    return {(o.__module__, o.__qualname__) for o in objects}


def _dcp_metadata_globals() -> set[tuple[str, str]]:
    """What DCP's ``.metadata`` pickle may refer to: DCP's metadata classes, sizes, paths."""
    return qualified_names(
        dcp_metadata.Metadata,
        dcp_metadata.ChunkStorageMetadata,
        dcp_metadata.TensorStorageMetadata,
        dcp_metadata.BytesStorageMetadata,
        dcp_metadata.TensorProperties,
        dcp_metadata.MetadataIndex,
        dcp_metadata.StorageMeta,
        dcp_metadata._MEM_FORMAT_ENCODING,
        dcp_filesystem._StorageInfo,
        torch.Size,
        pathlib.PurePosixPath,
        pathlib.PosixPath,
        pathlib.PureWindowsPath,
        pathlib.WindowsPath,
    ) | {
        ("torch.serialization", "_get_layout"),  # looks a torch.layout up by name
        ("collections", "OrderedDict"),
    }


class RestrictedUnpickler(pickle.Unpickler):
    """An unpickler that builds only allow-listed classes (and torch dtypes); anything else, e.g.
    ``os.system``, is refused before it is imported, so loading cannot run code.

    Why our own: DCP reads ``.metadata`` with plain ``pickle.load``, and ``torch.load(
    weights_only=True)`` cannot rebuild DCP's metadata or TorchRec's plan (dict subclasses)."""

    def __init__(self, file: Any, source: str, allowed: set[tuple[str, str]], what: str) -> None:
        super().__init__(file)
        self.source, self.allowed, self.what = source, allowed, what

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in self.allowed or (module == "torch" and name in _TORCH_DTYPES):
            return super().find_class(module, name)
        raise CheckpointError(
            f"{self.source} refers to {module}.{name}, which {self.what} never holds: refused to "
            f"load it (a crafted or foreign file could run code this way; see docs/operations.md#trust)"
        )

    def persistent_load(self, pid: Any) -> Any:
        raise CheckpointError(
            f"{self.source} refers to external data ({str(pid)[:40]}), which {self.what} never "
            f"holds: refused to load it (see docs/operations.md#trust)"
        )


class SafeFileSystemReader(FileSystemReader):
    """DCP's ``FileSystemReader`` whose ``.metadata`` is unpickled with an allow-list.

    DCP's own ``read_metadata`` uses ``pickle.load``: a crafted ``.metadata`` would run code on
    every rank that loads the checkpoint. Here only DCP's metadata classes, ``torch.Size``, torch
    dtypes/layouts and paths are built; anything else is a :class:`CheckpointError`.
    """

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        path = self._get_metadata_path(kwargs.get("rank"))
        try:
            with self.fs.create_stream(path, "rb") as f:
                metadata = RestrictedUnpickler(
                    f, str(path), _dcp_metadata_globals(), "DCP checkpoint metadata"
                ).load()
        except CheckpointError:
            raise
        except FileNotFoundError:
            raise CheckpointError(f"{path} is missing: not a complete DCP checkpoint") from None
        except Exception as e:  # truncated/garbled pickle: UnpicklingError, EOFError, ...
            raise CheckpointError(
                f"{path} is damaged ({type(e).__name__}: {_first_line(e)})"
            ) from None
        if not isinstance(metadata, Metadata):
            raise CheckpointError(f"{path} holds a {type(metadata).__name__}, not DCP metadata")
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


class SafeLoadPlanner(DefaultLoadPlanner):
    """DCP's ``DefaultLoadPlanner``, but non-tensor values are only loaded when
    ``torch.load(weights_only=True)`` accepts them (DCP loads them with ``weights_only=False``)."""

    def load_bytes(self, read_item: Any, value: io.BytesIO) -> None:
        try:
            torch.load(value, weights_only=True)
        except pickle.UnpicklingError as e:
            found = re.search(r"GLOBAL ([\w.]+)", str(e))
            raise CheckpointError(
                f"the checkpoint value {read_item.dest_index.fqn} needs "
                f"{found.group(1) if found else 'classes'} that torch.load(weights_only=True) "
                f"refuses: refused to load it (a crafted or foreign file could run code this way; "
                f"see docs/operations.md#trust)"
            ) from None
        value.seek(0)
        super().load_bytes(read_item, value)  # loads the same, checked bytes


def _first_line(e: BaseException, limit: int = 300) -> str:
    text = (str(e).strip().splitlines() or [""])[0]
    return text if len(text) <= limit else text[:limit] + "..."


def _root_cause(e: BaseException) -> BaseException:
    """The first rank's original exception inside DCP's CheckpointException (which wraps every
    rank's failure with its traceback in its message)."""
    while isinstance(e, CheckpointException) and e.failures:
        e = next(iter(sorted(e.failures.items())))[1][0]
    return e


def dcp_load(state: dict[str, Any], path: str | Path, *, no_dist: bool = False) -> None:
    """``dcp.load`` of a checkpoint directory that cannot execute code, with one-line errors.

    Uses :class:`SafeFileSystemReader` and :class:`SafeLoadPlanner`; collective unless
    ``no_dist``. Any failure (damaged file, mismatched state, refused content) is raised as a
    :class:`CheckpointError` naming the checkpoint.
    """
    # Every rank reads .metadata first: DCP would report a refused or damaged one only inside an
    # AssertionError of its own ("metadata is None; global metadata read failed: ...").
    SafeFileSystemReader(str(path)).read_metadata()
    try:
        dcp.load(
            state,
            storage_reader=SafeFileSystemReader(str(path)),
            planner=SafeLoadPlanner(),
            no_dist=no_dist,
        )
    except (KeyboardInterrupt, SystemExit):
        raise
    except BaseException as e:  # DCP's CheckpointException is a BaseException
        cause = _root_cause(e)
        if isinstance(cause, CheckpointError):
            raise CheckpointError(str(cause)) from None
        raise CheckpointError(
            f"cannot load checkpoint {path}: {type(cause).__name__}: {_first_line(cause)}"
        ) from None
