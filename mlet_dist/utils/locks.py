"""One writer per run directory and per output: :class:`RunLock` (``RUN/.lock``; ``train``
exclusive, ``collapse``/``evaluate`` shared), :class:`OutputLock` (``.<name>.lock`` beside an
output while a command writes it) on one machinery, :class:`FileLock` (``fcntl.flock``: the kernel
releases a lock when its process exits or is killed, so a dead holder's lock is taken over), and
:func:`hold_run`, the collective form a job uses (rank 0 checks and locks, every rank learns the
verdict). Why our own: neither torch nor TorchRec offers a run-directory or output lock.
"""

from __future__ import annotations

import contextlib
import datetime
import errno
import json
import logging
import os
import socket
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from mlet_dist.errors import MletError
from mlet_dist.utils.files import RUN_LOCK, resolve, writing

logger = logging.getLogger(__name__)


class RunLockedError(MletError, RuntimeError):
    """Another process holds the run directory's lock; the message names it."""


class OutputLockedError(MletError, RuntimeError):
    """Another process is writing the same output (it holds its lock); the message names it."""


# -- locks: one writer per run directory and per output ------------------------------------------


class FileLock:
    """``fcntl.flock`` on one lock file: exclusive for a writer, shared for readers. The machinery
    of :class:`RunLock` and :class:`OutputLock`, which say what is locked and how a refusal reads.

    A writer records ``{"pid", "host", "command", "since"}`` in the file so that a refused process
    can name it; the kernel drops the lock when the holder exits or is killed, so a lock left
    behind by a dead process is taken over by the next one (its stale record is overwritten).
    With ``remove`` the writer deletes the file as it releases the lock (no file is left beside an
    output); a process that locked the deleted file meanwhile sees that it is no longer the file
    at ``path`` and tries again. File systems without ``flock`` support get a warning and no lock.
    """

    def __init__(
        self, path: Path, target: Path, command: str, shared: bool = False, remove: bool = False
    ) -> None:
        self.path = path
        self.target = target
        self.command = command
        self.shared = shared
        self.remove = remove and not shared
        self._fd: int | None = None

    def _open(self) -> int | None:
        """The lock file's descriptor, or None to go on without a lock."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with writing(self.path):
            return os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)

    def _refusal(self, holder: dict[str, Any] | None) -> MletError:
        raise NotImplementedError

    def _unlocked(self, reason: str) -> None:
        logger.warning(
            "cannot lock %s (%s): this file system does not support flock; make sure no other "
            "process writes to %s at the same time",
            self.path, reason, self.target,
        )  # fmt: skip

    def acquire(self, wait: bool = False) -> FileLock:
        """Takes the lock; refused (the subclass's error, naming the holder) while another process
        holds it, or with ``wait`` blocks until it is released."""
        import fcntl

        mode = (fcntl.LOCK_SH if self.shared else fcntl.LOCK_EX) | (0 if wait else fcntl.LOCK_NB)
        for _ in range(100):  # another try only when a holder removed the file we locked
            fd = self._open()
            if fd is None:
                return self
            try:
                fcntl.flock(fd, mode)
            except BlockingIOError:
                holder = _read_holder(fd)
                os.close(fd)
                raise self._refusal(holder) from None
            except OSError as e:  # ENOLCK, EOPNOTSUPP...: the file system has no flock
                os.close(fd)
                self._unlocked(e.strerror or str(e))
                return self
            if self.remove and not _is_file_at(fd, self.path):
                os.close(fd)  # its holder removed it as it released it: lock the new file
                continue
            self._fd = fd
            with contextlib.suppress(OSError):  # a read-only lock file: nothing to record
                os.ftruncate(fd, 0)  # whatever is there is a dead holder's record
                if not self.shared:
                    record = {
                        "pid": os.getpid(),
                        "host": socket.gethostname(),
                        "command": self.command,
                        "since": datetime.datetime.now().isoformat(timespec="seconds"),
                    }
                    os.pwrite(fd, (json.dumps(record) + "\n").encode(), 0)
            return self
        raise RuntimeError(f"could not lock {self.path}: it was replaced 100 times")

    def release(self) -> None:
        if self._fd is None:
            return
        import fcntl

        with contextlib.suppress(OSError):
            if self.remove:
                self.path.unlink()  # while still holding it (see the class docstring)
            elif not self.shared:
                os.ftruncate(self._fd, 0)  # no stale record once the writer is done
            fcntl.flock(self._fd, fcntl.LOCK_UN)
        os.close(self._fd)
        self._fd = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def __enter__(self) -> FileLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()


def _is_file_at(fd: int, path: Path) -> bool:
    """The open file ``fd`` is the one ``path`` names now."""
    try:
        st = os.stat(path)
    except OSError:
        return False
    here = os.fstat(fd)
    return (st.st_dev, st.st_ino) == (here.st_dev, here.st_ino)


def _read_holder(fd: int) -> dict[str, Any] | None:
    """The writer's record in a lock file, or None (readers hold it, or the record is stale)."""
    try:
        raw = json.loads(os.pread(fd, 4096, 0).decode() or "null")
    except (OSError, ValueError):
        return None
    if not isinstance(raw, dict) or "pid" not in raw:
        return None
    if raw.get("host") == socket.gethostname():
        try:
            os.kill(int(raw["pid"]), 0)
        except ProcessLookupError:
            return None  # that process is gone: the lock is held by readers now
        except (PermissionError, ValueError):
            pass
    return raw


class RunLock(FileLock):
    """``RUN/.lock``: exclusive for the writer (train), shared for readers (collapse, evaluate).

    Example::

        with RunLock("runs/t", "train"):   # refused with RunLockedError while another holds it
            ...
    """

    def __init__(self, run_dir: str | Path, command: str, shared: bool = False) -> None:
        self.run_dir = Path(run_dir)
        super().__init__(self.run_dir / RUN_LOCK, self.run_dir, command, shared=shared)

    def _open(self) -> int | None:
        if self.shared and not (self.path.is_file() or (self.run_dir / "checkpoints").is_dir()):
            return None  # not a trained run (the caller refuses it): leave no lock file there
        if not self.shared:
            self.run_dir.mkdir(parents=True, exist_ok=True)
        try:
            return os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            if not self.shared or e.errno not in (errno.EACCES, errno.EPERM, errno.EROFS):
                raise
            try:  # a read-only run directory: readers lock what is there
                return os.open(self.path, os.O_RDONLY)
            except OSError:
                logger.warning("cannot open %s (%s): reading %s unlocked", self.path, e, self.run_dir)  # fmt: skip
                return None

    def _refusal(self, holder: dict[str, Any] | None) -> MletError:
        action = "read" if self.shared else "write to"
        if holder is None:
            return RunLockedError(
                f"cannot {action} the run directory {self.run_dir} (`mlet-dist {self.command}`): "
                f"another process is reading it (mlet-dist collapse or evaluate); wait for it to "
                f"finish"
            )
        return RunLockedError(
            f"cannot {action} the run directory {self.run_dir} (`mlet-dist {self.command}`): it is "
            f"in use by `mlet-dist {holder.get('command', '?')}`, pid {holder.get('pid')} on host "
            f"{holder.get('host')} (since {holder.get('since', '?')}), which holds {self.path}; "
            f"wait for it to finish or stop it (the lock is released when that process exits)"
        )


class OutputLock(FileLock):
    """One writer per output: an exclusive lock on ``.<name>.lock`` beside the output (its
    symlinks resolved, so a link and its target share one lock), removed when released.

    Every command that writes a directory or a set of files takes it once its output checks have
    passed (:func:`check_output`) and holds it until the output is complete: ``collapse --out``,
    ``preprocess --out``, ``generate`` (``data.dir``), each shard of ``sweep --work``. A second
    writer is refused, naming the first's pid and host. (Single files, ``predict --out`` and
    ``plan --out``, need none: each write is atomic and whole.)

    Args:
        out: the output directory (or file set).
        command: the command name recorded in the lock.
        what: what is written, for the message ("the serving directory").
        part: a part of ``out`` written independently of the others (a sweep's shard ``1-of-4``):
            locked alone, as ``.<name>.<part>.lock``.

    Example::

        with OutputLock("served", "collapse"):   # OutputLockedError while another holds it
            ...
    """

    def __init__(
        self, out: str | Path, command: str, what: str = "the output", part: str = ""
    ) -> None:
        self.out = resolve(out)
        self.what = what
        self.part = part
        lock = self.out.with_name(f".{self.out.name}{'.' + part if part else ''}.lock")
        super().__init__(lock, self.out, command, remove=True)

    def _refusal(self, holder: dict[str, Any] | None) -> MletError:
        part = f" ({self.part})" if self.part else ""
        head = f"cannot write {self.what} {self.out}{part} (`mlet-dist {self.command}`)"
        if holder is None:
            return OutputLockedError(
                f"{head}: another process is writing it (it holds {self.path}); wait for it to "
                f"finish"
            )
        return OutputLockedError(
            f"{head}: `mlet-dist {holder.get('command', '?')}`, pid {holder.get('pid')} on host "
            f"{holder.get('host')} (since {holder.get('since', '?')}), is writing it and holds "
            f"{self.path}; wait for it to finish or stop it (the lock is released when that "
            f"process exits)"
        )


@contextlib.contextmanager
def hold_run(
    run_dir: str | Path,
    env: Any,
    *,
    command: str,
    shared: bool,
    check: Callable[[], object] | None = None,
    output: str | Path | None = None,
) -> Iterator[None]:
    """Collective: rank 0 runs ``check`` (e.g. :func:`check_output`) and takes the run lock (and
    the :class:`OutputLock` of ``output``); every rank learns rank 0's verdict through one
    broadcast, so a refusal stops all ranks at once with the same error (instead of the others
    waiting in their first collective).

    Args:
        run_dir: the run directory.
        env: this process's :class:`~mlet_dist.distributed.parallelize.DistEnv`.
        command: the command name recorded in the lock (``train``, ``collapse``, ``evaluate``).
        shared: a reader's (shared) lock instead of the writer's (exclusive) one.
        check: validation run on rank 0 before the lock is taken.
        output: an output the job writes (``collapse --out``): locked too, after ``check``.
    """
    locks: list[FileLock] = []  # rank 0's
    error: BaseException | None = None
    if env.is_rank0:
        try:
            if check is not None:
                check()
            locks.append(RunLock(run_dir, command, shared=shared))
            if output is not None:
                locks.append(OutputLock(output, command))
            for lock in locks:
                lock.acquire()
        except Exception as e:
            error = e
            for lock in locks:
                lock.release()
    if env.world_size > 1:
        import pickle

        import torch.distributed as dist

        try:
            pickle.dumps(error)
        except Exception:
            error = MletError(str(error))
        box = [error]
        dist.broadcast_object_list(box, src=0)
        error = box[0]
    if error is not None:
        raise error
    try:
        yield
    finally:
        for lock in reversed(locks):
            lock.release()
