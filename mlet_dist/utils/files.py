"""Safe file output, in one place: atomic writes, the directory swap, output-path checks and "no
space left on device" reported as such; the run and output locks are :mod:`mlet_dist.utils.locks`.

Every command that writes goes through these helpers:

- **Atomic writes** (:func:`atomic_path`, :func:`atomic_write`, :func:`atomic_write_text`,
  :func:`atomic_write_json`): a temporary file next to the target, fsynced and renamed over it;
  removed when the write fails. A directory is built in a staging directory of its own attempt
  (:func:`staging_dir`) and swapped in whole (:func:`replace_dir`, Linux
  ``renameat2(RENAME_EXCHANGE)``). A symlinked target is written through: the link stays.
- **Outputs never overlap inputs** (:func:`check_output`): an output path (symlinks resolved) that
  is, contains or lies inside one of the command's inputs, a run directory, a checkpoint or a
  serving directory is refused, and an existing output is replaced only when it is a previous
  output of the same kind.
- **One writer per run directory** (:mod:`mlet_dist.utils.locks`: ``RunLock``, ``hold_run``): ``fcntl.flock`` on
  ``RUN/.lock``. ``train`` holds it exclusively (its pid, host and command are written into the
  file); ``collapse`` and ``evaluate`` hold it shared. The kernel releases it when the process
  exits or is killed, so a lock left by a dead process is simply taken over.
- **One writer per output** (``OutputLock``, the same machinery, ``FileLock``): an
  exclusive lock on ``.<name>.lock`` beside an output directory while a command writes it
  (``collapse``, ``preprocess``, ``generate``, a ``sweep`` shard); removed when released.
- **Disk full** (:func:`writing`, :func:`is_no_space`): ENOSPC, and torch's errors that hide it
  (DCP's ``CheckpointException``, ``enforce fail at inline_container.cc`` from ``torch.save``),
  become one :class:`NoSpaceError` naming the path.

Why our own helpers: Python's standard library has no atomic-write or directory-exchange helper,
and neither torch nor TorchRec offers a run-directory or output lock; these are thin wrappers over
``tempfile``, ``os.replace``, ``renameat2`` and ``fcntl.flock``.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import glob
import hashlib
import json
import logging
import math
import os
import secrets
import shutil
import tempfile
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, BinaryIO

from mlet_dist.errors import MletError

logger = logging.getLogger(__name__)

RUN_LOCK = ".lock"
"""The lock file of a run directory (``RUN/.lock``)."""
SERVING_MANIFEST = "manifest.json"
"""The file that marks a serving directory (``mlet-dist collapse`` output)."""


class OutputPathError(MletError, ValueError):
    """An output path would overwrite or mix with an input, a run, a checkpoint or other data."""


class NoSpaceError(MletError, OSError):
    """The file system of an output is full (ENOSPC / EDQUOT); the message names the path."""

    def __init__(self, message: str, path: str | Path | None = None) -> None:
        super().__init__(errno.ENOSPC, message)
        self.message = message
        self.path = None if path is None else str(path)

    def __str__(self) -> str:
        return self.message

    def __reduce__(self) -> Any:  # picklable (broadcast to the other ranks)
        return (type(self), (self.message, self.path))


# -- disk full ------------------------------------------------------------------------------------

_NO_SPACE_TEXT = ("No space left on device", "Disk quota exceeded")


def is_no_space(exc: BaseException, writing: bool = False) -> bool:
    """Whether ``exc`` (or an exception it wraps) means the disk or the quota is full.

    Args:
        exc: the exception; its ``__cause__``/``__context__`` chain and, for DCP's
            ``CheckpointException``, every rank's failure are searched too.
        writing: ``exc`` was raised while writing: torch's zip writer then reports a full disk
            only as ``[enforce fail at inline_container.cc:…] . unexpected pos …``, which counts.
    """
    stack: list[Any] = [exc]
    seen: set[int] = set()
    while stack:
        e = stack.pop()
        if isinstance(e, tuple) and e:  # DCP wraps each rank's failure as (exception, traceback)
            e = e[0]
        if not isinstance(e, BaseException) or id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        text = str(e)
        if any(t in text for t in _NO_SPACE_TEXT):
            return True
        if writing and "enforce fail at inline_container" in text:
            return True
        stack += [e.__cause__, e.__context__]
        failures = getattr(e, "failures", None)
        if isinstance(failures, dict):
            stack += list(failures.values())
    return False


def _free_bytes(path: Path) -> int | None:
    for p in (path, *path.parents):
        try:
            return shutil.disk_usage(p).free
        except OSError:
            continue
    return None


def _human(n: int) -> str:
    size = float(n)
    for unit in ("bytes", "KiB", "MiB", "GiB", "TiB"):
        if size < 1024 or unit == "TiB":
            return f"{size:.0f} {unit}" if unit == "bytes" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{n} bytes"


def no_space_error(path: str | Path) -> NoSpaceError:
    """The one-line error for a full file system while writing ``path``."""
    free = _free_bytes(Path(path).absolute())
    left = f"{_human(free)} free on its file system" if free is not None else "free space unknown"
    # (callers build this before removing the partial output: the free space as the write failed)
    return NoSpaceError(
        f"no space left on device: cannot write {path} ({left}); the partial output was removed. "
        f"Free some space or write to another file system",
        path,
    )


@contextlib.contextmanager
def writing(path: str | Path) -> Iterator[None]:
    """Turns a full-disk failure inside the block into :class:`NoSpaceError` naming ``path``."""
    try:
        yield
    except NoSpaceError:
        raise
    except BaseException as e:  # DCP's CheckpointException is a BaseException
        if not isinstance(e, (KeyboardInterrupt, SystemExit)) and is_no_space(e, writing=True):
            raise no_space_error(path) from e
        raise


def sha256_file(path: str | Path, block: int = 8 << 20) -> str:
    """Hex sha256 of a file's bytes (the checksums of manifests and vocabularies)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(block):
            h.update(chunk)
    return h.hexdigest()


def remove_path(path: str | Path) -> None:
    """Removes a file or directory tree if it exists (best effort: cleanup after a failure)."""
    p = Path(path)
    if p.is_dir() and not p.is_symlink():
        shutil.rmtree(p, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError, IsADirectoryError, PermissionError):
            p.unlink()


# -- atomic writes --------------------------------------------------------------------------------


def temp_path(final: str | Path) -> Path:
    """A new empty temporary file ``.<name>.XXXX.tmp`` next to ``final`` (parents created)."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=final.parent, prefix=f".{final.name}.", suffix=".tmp")
    os.close(fd)
    return Path(tmp)


def publish_file(tmp: str | Path, final: str | Path) -> None:
    """Makes a finished temporary file durable and renames it to ``final`` (atomic)."""
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.chmod(tmp, 0o644)  # mkstemp creates 0600; outputs are meant to be shared
    os.replace(tmp, final)


@contextlib.contextmanager
def atomic_path(final: str | Path) -> Iterator[Path]:
    """Yields a temporary path next to ``final``; renames it to ``final`` when the block succeeds.

    On any failure the temporary file is removed and ``final`` is untouched; a full disk is
    raised as :class:`NoSpaceError` naming ``final``. A symlink ``final`` is written through: the
    file it points to is replaced, the link stays.
    """
    final = Path(final)
    target = resolve(final) if final.is_symlink() else final
    with writing(final):
        tmp = temp_path(target)
        try:
            yield tmp
            publish_file(tmp, target)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise


def atomic_write(final: str | Path, write: Callable[[BinaryIO], None]) -> None:
    """Writes ``final`` atomically with ``write(file)`` (see :func:`atomic_path`)."""
    with atomic_path(final) as tmp, open(tmp, "wb") as f:
        write(f)


def atomic_write_text(final: str | Path, text: str) -> None:
    atomic_write(final, lambda f: f.write(text.encode()))


def finite_json(obj: Any) -> Any:
    """``obj`` with NaN/inf floats as None: strict JSON has no NaN (an undefined metric is null)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, (dict, list, tuple)):
        items = obj.items() if isinstance(obj, dict) else enumerate(obj)
        out = {k: finite_json(v) for k, v in items}
        return out if isinstance(obj, dict) else list(out.values())
    return obj


def atomic_write_json(final: str | Path, obj: Any) -> None:
    """``obj`` as strict JSON (non-finite floats as ``null``: :func:`finite_json`), atomically."""
    atomic_write_text(final, json.dumps(finite_json(obj), indent=1, allow_nan=False) + "\n")


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swaps two directories (Linux ``renameat2(RENAME_EXCHANGE)``); False if unsupported."""
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    return renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0


def staging_dir(out: str | Path) -> Path:
    """A new empty directory ``.<name>.tmp-<pid>-<random>`` beside ``out`` (symlinks resolved),
    where one attempt builds its output before :func:`replace_dir` swaps it in.

    The name is this attempt's alone, so two writers never fill one staging directory (what a
    manifest lists is what its own attempt wrote). The staging directories that earlier attempts
    left when they died are removed: the caller holds ``out``'s :class:`OutputLock`, so none of
    them is a live attempt's.
    """
    target = resolve(out)
    target.parent.mkdir(parents=True, exist_ok=True)
    for old in target.parent.glob(f".{glob.escape(target.name)}.tmp*"):
        if old.is_dir() and not old.is_symlink():
            shutil.rmtree(old, ignore_errors=True)
    while True:
        staging = target.with_name(f".{target.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}")
        with contextlib.suppress(FileExistsError):
            staging.mkdir()
            return staging


def replace_dir(staging: str | Path, out: str | Path) -> None:
    """Moves a complete ``staging`` directory to ``out``; a previous ``out`` stays whole until then.

    On Linux the two directories are exchanged in one atomic rename, so ``out`` is at every moment
    either the old or the new complete result. Elsewhere ``out`` is renamed aside first (a crash
    in between leaves the old result in ``<out>.old``). A symlink ``out`` is resolved: the
    directory it points to is replaced, the link stays. Callers check ``out`` first
    (:func:`check_output`), hold its :class:`OutputLock` and build ``staging`` with
    :func:`staging_dir` (beside the resolved ``out``): only a previous output of the same kind
    may be replaced.
    """
    staging, out = Path(staging), Path(out)
    if out.is_symlink():
        out = resolve(out)
    if not out.exists():
        staging.rename(out)
        return
    if _exchange(staging, out):
        shutil.rmtree(staging)  # now the previous result
        return
    old = out.with_name(out.name + ".old")
    shutil.rmtree(old, ignore_errors=True)
    out.rename(old)
    staging.rename(out)
    shutil.rmtree(old, ignore_errors=True)


# -- what a path is -------------------------------------------------------------------------------


def resolve(path: str | Path) -> Path:
    """The absolute path with symlinks resolved (the path need not exist).

    Raises:
        OutputPathError: the path is a symlink loop.
    """
    try:
        return Path(path).expanduser().resolve()
    except (RuntimeError, OSError) as e:  # "Symlink loop" (3.11), ELOOP (3.13)
        raise OutputPathError(f"cannot resolve {path}: {e}; fix or remove the symlink") from e


def is_within(path: Path, parent: Path) -> bool:
    """``path`` is ``parent`` or lies below it (both resolved)."""
    return path == parent or parent in path.parents


def is_run_dir(path: Path) -> bool:
    """A training run directory: it has a ``checkpoints/`` directory, or a ``config.json`` of
    this project (model and train sections) and no serving manifest. (A ``.lock`` file alone
    says nothing: other tools, pytest's temporary directories among them, use that name too.)"""
    if (path / "checkpoints").is_dir():
        return True
    config = path / "config.json"
    if not config.is_file() or (path / SERVING_MANIFEST).exists():
        return False
    try:
        raw = json.loads(config.read_text())
    except (OSError, ValueError):
        return False
    return isinstance(raw, dict) and {"model", "train"} <= raw.keys()


def is_checkpoint(path: Path) -> bool:
    """A DCP checkpoint (has ``.metadata``) or an entry of a run's ``checkpoints/`` directory."""
    if (path / ".metadata").is_file():
        return True
    return path.name.startswith("step_") and path.parent.name == "checkpoints"


def is_serving_dir(path: Path) -> bool:
    return (path / SERVING_MANIFEST).is_file()


def check_output(
    out: str | Path,
    *,
    what: str,
    inputs: Sequence[str | Path] = (),
    previous: Callable[[Path], str | None] | None = None,
    allowed: Sequence[str | Path] = (),
    run_output: bool = False,
    hint: str = "choose another path",
) -> Path:
    """Refuses an output path that would destroy or mix with something it must not.

    Refused: an output that is, contains or lies inside one of ``inputs``; that is or lies inside
    a run directory or a checkpoint; that lies inside a serving directory; or that exists and is
    not a previous output of the same kind (``previous``).

    Args:
        out: the file or directory about to be written (as the user gave it).
        what: what is written, for the message ("the serving directory").
        inputs: paths the command reads.
        previous: for an existing ``out``: None when it is a previous output of this kind (it may
            be replaced or added to), else the reason it is not. None: an existing ``out`` is
            refused.
        allowed: exact output paths that may lie inside a run directory or an input (the slots
            the project itself uses there, e.g. ``RUN/served``).
        run_output: ``out`` is a run directory (``train``): it may be one, and it may lie inside
            an input directory (a run inside the data directory harms neither).
        hint: the fix, appended to the message.

    Returns:
        The resolved output path.

    Raises:
        OutputPathError: one line naming the output, the conflicting path and the fix.
    """
    target = resolve(out)
    ok_inside = {resolve(a) for a in allowed}

    def refuse(reason: str) -> OutputPathError:
        return OutputPathError(f"refusing to write {what} to {out}: {reason}; {hint}")

    exists = target.exists()
    if exists and not run_output and is_run_dir(target):
        raise refuse(f"it is the run directory {target} (a training run: config, checkpoints)")
    if exists and is_checkpoint(target):
        raise refuse(f"it is the checkpoint {target}")
    for parent in target.parents:
        if is_checkpoint(parent):
            raise refuse(f"it lies inside the checkpoint {parent}")
        if is_run_dir(parent) and target not in ok_inside:
            raise refuse(f"it lies inside the run directory {parent}")
        if is_serving_dir(parent):
            raise refuse(f"it lies inside the serving directory {parent}")
    for given in inputs:
        src = resolve(given)
        if target == src:
            raise refuse(f"it is the input {src}")
        if is_within(src, target):
            raise refuse(f"it contains the input {src}")
        if is_within(target, src) and target not in ok_inside and not run_output:
            raise refuse(f"it lies inside the input {src}")
    if exists or target.is_symlink():
        reason = previous(target) if previous is not None else f"{target} already exists"
        if reason:
            raise refuse(reason)
    return target
