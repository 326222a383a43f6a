"""Files that can be trusted: written whole or not at all, never over an input, never through a link.

Every file dreg_jax writes goes through here:

* :func:`atomic_write` writes a new file beside the target (``O_CREAT | O_EXCL``, a fresh name,
  so a planted file or link at a fixed ``.tmp`` name is never written through), ``fsync``\\ s it
  and renames it over the target: a reader, or a later run after a kill, sees the old file or the
  new one, never a mix. A target that is a symbolic link is refused (replacing it would silently
  turn a link the user made into a file; writing through it would follow a link we did not make).
* :func:`exclusive_lock` takes an ``flock`` on a lock file opened with ``O_NOFOLLOW``: a symlink
  planted at the lock's name is refused, never truncated or followed.
* :func:`check_outputs` is called by every command before any work: an output that is one of the
  command's inputs (the same file, hard links included: ``os.path.samefile``), lies inside an
  input directory (a model directory), or is not writable, is refused in one line.
* :func:`fault` is a test hook: ``DREG_JAX_FAULT=<point>:kill`` SIGKILLs the process when it
  reaches ``<point>``, ``<point>:enospc`` raises ``OSError(ENOSPC)`` there (the kill, disk-full
  and interrupted-save tests use it; unset, it costs one dict lookup).

Standard library only.
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import pathlib
import signal
import stat
import tempfile

FAULT_VARIABLE = "DREG_JAX_FAULT"


def fault(point: str):
    """Test hook (module docs): act on ``DREG_JAX_FAULT`` when it names ``point``."""
    spec = os.environ.get(FAULT_VARIABLE)
    if not spec:
        return
    name, _, action = spec.rpartition(":")
    if name != point:
        return
    if action == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    if action == "enospc":
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    if action == "interrupt":
        raise KeyboardInterrupt


def fsync_directory(directory):
    """Makes a rename or a new entry in ``directory`` durable."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_all(fd: int, data: bytes, fault_point: str | None = None):
    """Writes every byte of ``data`` to ``fd`` (``fault_point``: the test hook fires half-way)."""
    view = memoryview(data)
    if fault_point is not None:
        half = len(view) // 2
        while view[:half]:
            done = os.write(fd, view[:half])
            view, half = view[done:], half - done
        fault(fault_point)
    while view:
        view = view[os.write(fd, view):]


def create_exclusive(path, mode: int = 0o644) -> int:
    """A new file opened for writing; refuses an existing name, a link included (``O_EXCL``)."""
    return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, mode)


def atomic_write(path, data, *, what: str = "output", mode: int = 0o644) -> pathlib.Path:
    """Replaces ``path`` with ``data`` (bytes or text) whole, or leaves it as it was.

    Args:
      path: the file; its directory is created if needed. A symbolic link there is refused.
      data: ``bytes`` or ``str`` (UTF-8).
      what: how messages name the file (e.g. ``"--out"``).
      mode: the new file's permission bits (less the umask).

    Returns:
      ``path``.
    """
    with atomic_output(path, what=what, binary=True, mode=mode) as f:
        f.write(data.encode("utf-8") if isinstance(data, str) else data)
    return pathlib.Path(path)


def current_umask() -> int:
    """The process umask (read without changing it for longer than the call)."""
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_output(path, *, what: str = "output", binary: bool = False, newline: str | None = None,
                  encoding: str = "utf-8", mode: int = 0o644):
    """A file object whose content replaces ``path`` whole when the block ends without an error
    (an error or a kill leaves the old file): the temporary file is created with ``O_EXCL`` beside
    the target, fsynced and renamed over it. For outputs too large to hold in memory; text unless
    ``binary``."""
    path = pathlib.Path(path)
    _refuse_link_or_directory(path, what)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with (os.fdopen(fd, "wb") if binary else os.fdopen(fd, "w", newline=newline, encoding=encoding)) as f:
            yield f
            f.flush()
            os.fchmod(f.fileno(), mode & ~current_umask())
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    fsync_directory(path.parent)


def save_figure(fig, path, **savefig_kwargs) -> pathlib.Path:
    """A matplotlib figure saved whole to ``path`` (:func:`atomic_write`, format from the suffix),
    then closed."""
    import io

    import matplotlib.pyplot as plt

    path = pathlib.Path(path)
    buffer = io.BytesIO()
    try:
        fig.savefig(buffer, format=path.suffix.lstrip(".") or "png", **savefig_kwargs)
    finally:
        plt.close(fig)
    return atomic_write(path, buffer.getvalue(), what="figure")


class LockHeld(RuntimeError):
    """Another process holds the lock."""


@contextlib.contextmanager
def exclusive_lock(path, *, holder: str, wait: bool = False, remove: bool = False):
    """Holds an exclusive ``flock`` on ``path`` (created if needed) for the block.

    The lock file is opened with ``O_NOFOLLOW``: a symbolic link planted at its name is refused,
    never followed or truncated, and it is never truncated itself. ``holder`` says in the error
    what the other process is doing (e.g. "another sweep is writing r.jsonl"); ``wait`` waits
    for the other process instead of refusing. ``remove`` deletes the lock file when the block
    ends (while still holding it; a process that locked the old file then sees that its name
    points elsewhere and retries on the new one), so a finished command leaves nothing behind.
    """
    path = pathlib.Path(path)
    while True:
        fd = _open_lock(path)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
            except BlockingIOError:
                raise LockHeld(f"{holder} (lock {path}); wait for it to finish or pick another path") from None
            try:  # the name may have been removed by the holder we waited for: lock the new file
                current = os.stat(path, follow_symlinks=False)
            except FileNotFoundError:
                current = None
            mine = os.fstat(fd)
            if current is None or (current.st_dev, current.st_ino) != (mine.st_dev, mine.st_ino):
                os.close(fd)
                fd = None
                continue
            try:
                yield
            finally:
                if remove:
                    with contextlib.suppress(OSError):
                        os.unlink(path)
            return
        finally:
            if fd is not None:
                os.close(fd)


def _open_lock(path: pathlib.Path) -> int:
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)
    except OSError as err:
        if err.errno == errno.ELOOP:
            raise OSError(f"lock file {path} is a symbolic link; dreg_jax never follows a link it did not "
                          "make: remove it") from None
        raise OSError(f"lock file {path} cannot be opened: {err.strerror or err}") from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise OSError(f"lock file {path} is not a regular file; remove it")
    return fd


def _same(a: pathlib.Path, b: pathlib.Path) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return a.resolve() == b.resolve()


def _inside(path: pathlib.Path, directory: pathlib.Path) -> bool:
    return path.resolve().is_relative_to(directory.resolve())


def check_outputs(outputs: dict, inputs: dict):
    """Refuses, in one line, an output that would write over an input.

    Args:
      outputs: ``flag -> path`` of what the command writes (files, or directories such as a
        model directory, whose every file counts).
      inputs: ``flag -> path`` of what it reads (files or directories; missing ones are skipped).

    An output may not be an input file (``os.path.samefile``: hard links and symlinks included),
    lie inside an input directory, or hold an input inside it (an output directory). Two outputs
    may not be one file either.
    """
    outputs = {k: pathlib.Path(v) for k, v in outputs.items() if v is not None}
    inputs = {k: pathlib.Path(v) for k, v in inputs.items() if v is not None}
    for out_flag, out in outputs.items():
        for in_flag, src in inputs.items():
            if not src.exists():
                continue
            files = [src] if not src.is_dir() else [src, *(p for p in src.iterdir() if p.is_file())]
            if out.exists() and any(_same(out, f) for f in files):
                raise ValueError(f"{out_flag} {out} is the input {in_flag} {src} (the same file); the command "
                                 "would destroy its own input: write to another path")
            if src.is_dir() and _inside(out, src):
                raise ValueError(f"{out_flag} {out} lies inside the input {in_flag} {src}; the command would "
                                 "change its own input: write outside it")
        for other_flag, other in outputs.items():
            if other_flag < out_flag and (out.resolve() == other.resolve() or _inside(out, other)
                                          or _inside(other, out)):
                raise ValueError(f"{out_flag} {out} and {other_flag} {other} overlap; give them separate paths")


def _refuse_link_or_directory(path: pathlib.Path, what: str):
    if path.is_symlink():
        raise ValueError(f"{what} {path} is a symbolic link; dreg_jax never writes through a link it did not "
                         "make: remove the link or give the real path")
    if path.is_dir():
        raise ValueError(f"{what} {path} is a directory; give a file name, e.g. {path / 'out.json'}")


def check_writable_file(path, what: str):
    """Refuses, before any work, a file output that cannot be written: a directory, a symbolic link,
    a read-only file, or a path under a file or an unwritable directory."""
    path = pathlib.Path(path)
    _refuse_link_or_directory(path, what)
    if path.exists() and not (os.access(path, os.W_OK) and path.stat().st_mode & 0o222):
        raise ValueError(f"{what} {path} is read-only; make it writable or give another path")
    _check_creatable_parent(path, what)


def check_writable_directory(path, what: str):
    """Refuses, before any work, a directory output that cannot be created or written into."""
    path = pathlib.Path(path)
    if path.is_symlink():
        raise ValueError(f"{what} {path} is a symbolic link; dreg_jax never writes through a link it did not "
                         "make: remove the link or give the real path")
    if path.exists() and not path.is_dir():
        raise ValueError(f"{what} {path} is a file; give a directory")
    if path.is_dir() and not (os.access(path, os.W_OK | os.X_OK) and path.stat().st_mode & 0o222):
        raise ValueError(f"{what} {path} is read-only; make it writable or give another directory")
    _check_creatable_parent(path, what)


def _check_creatable_parent(path: pathlib.Path, what: str):
    ancestor = path.parent
    while not ancestor.exists() and not ancestor.is_symlink():
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise ValueError(f"{what} {path} lies under {ancestor}, which is a file, not a directory; give another path")
    if not (os.access(ancestor, os.W_OK | os.X_OK) and ancestor.stat().st_mode & 0o222):
        raise ValueError(f"{what} {path} cannot be created: {ancestor} is read-only")
    try:  # the permission bits can pass on a read-only filesystem: try for real
        fd, probe = tempfile.mkstemp(dir=ancestor, prefix=".dreg_jax-probe-")
        os.close(fd)
        os.unlink(probe)
    except OSError as err:
        raise ValueError(f"{what} {path} cannot be created in {ancestor}: {err.strerror or err}") from None


__all__ = ["FAULT_VARIABLE", "LockHeld", "atomic_output", "atomic_write", "check_outputs", "check_writable_directory",
           "check_writable_file", "create_exclusive", "current_umask", "exclusive_lock", "fault", "fsync_directory", "save_figure", "write_all"]
