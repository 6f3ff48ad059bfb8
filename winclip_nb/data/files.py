"""Safe files: names that are valid everywhere, atomic writes, and one lock.

Every file the package writes (results, class files, synthetic images, memory banks,
reports) goes through :func:`atomic_write`: a temporary file next to the target, then
``os.replace``, so a reader (or a resumed run) never sees half a file.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import socket
import uuid
from collections.abc import Iterator
from pathlib import Path

from ..core.errors import StorageError

_WINDOWS_RESERVED = frozenset(
    ["CON", "PRN", "AUX", "NUL"] + [f"{port}{i}" for port in ("COM", "LPT") for i in range(1, 10)]
)


def safe_name(name: str) -> str:
    """A file-name stem that is safe on every OS (never empty, never hidden).

    Path separators, ``..``, control characters, whitespace and ``<>:"|?*`` become
    ``_``; a leading ``.`` becomes ``_``; Windows device names get a trailing ``_``.
    Different names can map to the same stem (``a/b`` and ``a_b``).

    >>> safe_name("../../etc"), safe_name("a/b"), safe_name(""), safe_name(".hidden")
    ('____etc', 'a_b', '_', '_hidden')
    """
    stem = re.sub(r'\.\.|[/\\\x00-\x1f\x7f<>:"|?*\s]', "_", str(name))
    if stem.startswith("."):
        stem = "_" + stem[1:]
    if not stem:
        stem = "_"
    if stem.split(".")[0].upper() in _WINDOWS_RESERVED:
        stem += "_"
    return stem


def _host_tag() -> str:
    """This machine's name as a file-name part (no dots)."""
    return re.sub(r"[^A-Za-z0-9_-]", "_", socket.gethostname()) or "host"


#: Temporary names written by :func:`atomic_write`: ``.<name>.<host>.<pid>.<token>.tmp``.
_TEMP_NAME = re.compile(
    r"^\.(?P<name>.+)\.(?P<host>[A-Za-z0-9_-]+)\.(?P<pid>\d+)\.[0-9a-f]{12}\.tmp$"
)


#: Why a write failed, in words, by ``errno`` (anything else: the system's own message).
_WRITE_FAILURES = {
    errno.ENOSPC: "no space left on the device",
    errno.EDQUOT: "disk quota exceeded",
    errno.EACCES: "permission denied",
    errno.EPERM: "operation not permitted",
    errno.EROFS: "read-only file system",
}


def storage_error(path: str | os.PathLike, exc: OSError) -> StorageError:
    """A :class:`StorageError` naming ``path`` and why writing it failed.

    >>> str(storage_error("out/a.json", OSError(errno.ENOSPC, "No space left on device")))
    'cannot write out/a.json: no space left on the device'
    """
    reason = _WRITE_FAILURES.get(exc.errno or 0) or exc.strerror or str(exc)
    error = StorageError(f"cannot write {path}: {reason}")
    error.errno = exc.errno
    return error


def ensure_folder(path: str | os.PathLike) -> Path:
    """Create the folder ``path`` (and its parents); :class:`StorageError` if it cannot be."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise storage_error(path, exc) from exc
    return path


def atomic_write(path: str | os.PathLike, data: bytes | str) -> Path:
    """Write ``data`` to ``path`` through a temporary file next to it and ``os.replace``.

    The temporary name carries the host, the process id and a random token, so
    concurrent writers (threads, processes, machines sharing the folder) never write
    into the same temporary file. A failed write removes its temporary file and raises
    :class:`StorageError` naming ``path`` (full disk, no permission, read-only disk), so
    the target is either the old file, or absent, or complete. A temporary file left
    by a killed process is removed by :func:`remove_stale_temps`. Folders are created.

    >>> import tempfile; folder = Path(tempfile.mkdtemp())
    >>> atomic_write(folder / "a.txt", "hello").read_text()
    'hello'
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{_host_tag()}.{os.getpid()}.{uuid.uuid4().hex[:12]}.tmp")
    ensure_folder(path.parent)
    try:
        with open(tmp, "wb") as handle:
            handle.write(data.encode("utf-8") if isinstance(data, str) else data)
        os.replace(tmp, path)
    except BaseException as exc:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
        if isinstance(exc, OSError) and not isinstance(exc, StorageError):
            raise storage_error(path, exc) from exc
        raise
    return path


def _pid_alive(pid: int) -> bool:
    """False only if no process ``pid`` exists on this machine (POSIX)."""
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # PermissionError: it exists, owned by someone else
        return True
    return True


def remove_stale_temps(*folders: Path) -> list[Path]:
    """Remove temporary files that a killed process on this machine left in ``folders``.

    Only files named by :func:`atomic_write` with this host and the id of a process that
    no longer exists; those of running processes and other machines stay. POSIX only.
    """
    if os.name != "posix":
        return []
    host, removed = _host_tag(), []
    for folder in folders:
        if not folder.is_dir():
            continue
        for path in folder.glob(".*.tmp"):
            match = _TEMP_NAME.match(path.name)
            if match and match["host"] == host and not _pid_alive(int(match["pid"])):
                path.unlink(missing_ok=True)
                removed.append(path)
    return removed


@contextlib.contextmanager
def file_lock(path: str | os.PathLike) -> Iterator[None]:
    """Hold an exclusive advisory lock on the file ``path`` (``fcntl.flock``), waiting
    for another process that holds it. The lock goes with its process, so a killed run
    never leaves it stuck. Not re-entrant (never nest it on one path). Where ``fcntl``
    does not exist (Windows) it does not lock.
    """
    path = Path(path)
    ensure_folder(path.parent)
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows
        yield
        return
    try:
        handle = open(path, "a", encoding="utf-8")  # noqa: SIM115 - closed below
    except OSError as exc:
        raise storage_error(path, exc) from exc
    with handle:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)
