"""Files that readers never see half-written: the one "write a temporary file, fsync, rename" of the project.

Every file the commands write for others to read (JSON results, token arrays and chunks, FID statistics,
sample archives, the training history) goes through ``atomic_write``: the bytes go to ``<name>.tmp<pid>``
beside the target, are flushed and fsync'ed, and ``os.replace`` puts the finished file in place in one step
(atomic on POSIX and Windows within one file system). A crash leaves either the old file or the new one,
plus at most a ``*.tmp<pid>`` file that the next writer overwrites or a reader may delete.

Whole folders (checkpoints, the classifier cache, pruned exports) are written under a temporary name and
renamed into place by ``publish_folder``.

Caches that several processes may fill at once (the classifier of a data set, token directories, pruned
exports) are built under ``file_lock(<target>)``, an exclusive ``filelock`` lock on ``<target>.lock``: the first
process builds and publishes, every other one waits, then finds the target and loads it. A process that dies
holding the lock releases it with its file descriptor (fcntl), so a crash never leaves a cache locked.
"""
from __future__ import annotations

import contextlib
import errno
import json
import math
import os
import shutil
from pathlib import Path
from typing import IO, Any, Iterator

from filelock import FileLock, Timeout


def temporary_path(path: str | os.PathLike) -> Path:
    """``<path>.tmp<pid>``: the temporary name beside ``path`` that this process writes before the rename."""
    path = Path(path)
    return path.with_name(f"{path.name}.tmp{os.getpid()}")


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "wb") -> Iterator[IO]:
    """Open a temporary file beside ``path`` (creating the parent folder); when the block ends without an
    exception the file is flushed, fsync'ed and renamed onto ``path``; on an exception it is removed (an OSError,
    such as a full disk, is raised again naming ``path``; the previous file at ``path`` is untouched)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_path(path)
    try:
        with open(tmp, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as err:
        tmp.unlink(missing_ok=True)
        if isinstance(err, OSError) and err.errno is not None:  # e.g. ENOSPC: say which file and what is left
            left = f"the previous {path.name} is unchanged" if path.exists() else "nothing was written"
            raise OSError(err.errno, f"could not write {path}: {err.strerror or err} "
                                     f"({errno.errorcode.get(err.errno, err.errno)}). The partial file was removed; "
                                     f"{left}") from err
        raise


@contextlib.contextmanager
def file_lock(path: str | os.PathLike, enabled: bool = True) -> Iterator[None]:
    """Hold the exclusive lock ``<path>.lock`` for the block (``enabled=False``: a no-op, e.g. on the processes of a
    distributed job other than the main one, which the main one's barrier holds back instead)."""
    if not enabled:
        yield
        return
    with FileLock(lock_file(path)):
        yield


def lock_file(path: str | os.PathLike) -> str:
    """``<path>.lock``, the file behind ``file_lock(path)`` (its folder created)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    return str(path.with_name(f"{path.name}.lock"))


def lock_is_held(path: str | os.PathLike) -> bool:
    """True when another process holds ``file_lock(path)`` at this moment (a probe: the lock is taken without
    waiting and released at once, so the answer may be stale the next moment; callers still take ``file_lock``
    before they touch what it guards). Never call it on a lock this process holds: the probe would see it held."""
    probe = FileLock(lock_file(path))
    try:
        probe.acquire(timeout=0)
    except Timeout:
        return True
    probe.release()
    return False


def publish_folder(temporary: str | os.PathLike, final: str | os.PathLike, replace: bool = False) -> bool:
    """Rename the finished folder ``temporary`` to ``final`` in one step. When ``final`` exists: with ``replace`` the
    old folder is swapped out first (moved aside, then deleted), else the first writer wins: ``temporary`` is
    deleted and False returned. True when ``temporary`` became ``final``."""
    temporary, final = Path(temporary), Path(final)
    if replace and final.exists():
        stale = final.with_name(f".old-{final.name}.{os.getpid()}")
        shutil.rmtree(stale, ignore_errors=True)
        os.replace(final, stale)
        os.replace(temporary, final)
        shutil.rmtree(stale, ignore_errors=True)
        return True
    try:
        os.rename(temporary, final)
    except OSError as err:
        if err.errno not in (errno.ENOTEMPTY, errno.EEXIST) and not final.exists():
            raise
        shutil.rmtree(temporary, ignore_errors=True)
        return False
    return True


def write_bytes_atomic(path: str | os.PathLike, data: bytes) -> Path:
    """``data`` to ``path`` through ``atomic_write``."""
    with atomic_write(path, "wb") as f:
        f.write(data)
    return Path(path)


def json_safe(value: Any) -> Any:
    """``value`` with every non-finite float (nan, inf) replaced by None, in nested dicts, lists and tuples:
    strict JSON has no NaN."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


def write_json(path: str | os.PathLike, payload: Any) -> Path:
    """``payload`` as indented, key-sorted JSON (non-finite floats become null), written atomically."""
    return write_bytes_atomic(path, json.dumps(json_safe(payload), indent=2, sort_keys=True).encode())
