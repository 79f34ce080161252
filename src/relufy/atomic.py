"""Writing outputs so that a failure never leaves a half-written file or folder behind.

A folder is built in a hidden sibling `.<name>.<pid>.<random>.relufy-tmp` and renamed at the end.
Anything that stops the process on the way (an error, Ctrl-C, SIGTERM: the CLI turns it into
KeyboardInterrupt) removes it; one left by a process that was killed outright (kill -9, power
loss) is swept by the next write of the same output, once its process is gone.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from .errors import OutputError, OutputExistsError

TMP_SUFFIX = ".relufy-tmp"


@contextmanager
def atomic_directory(out: Path, *, replace: bool) -> Iterator[Path]:
    """Yield a temporary sibling of `out`; on success it becomes `out`, on failure it vanishes.

    An `out` that exists at the end is replaced only with `replace` (the user's --force).
    """
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        sweep_stale(out)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.{os.getpid()}.", suffix=TMP_SUFFIX, dir=out.parent))
    except PermissionError as exc:
        raise OutputError(f"cannot write {out}: {exc.strerror} in {exc.filename or out.parent}; choose a "
                          "writable output location") from None
    try:
        yield tmp
        respect_umask(tmp)  # mkdtemp's 0700 and safetensors' 0600 would outlive the rename
        if out.exists():
            if not replace:
                raise OutputExistsError(f"{out} exists; pass --force to replace it")
            shutil.rmtree(out) if out.is_dir() else out.unlink()
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def sweep_stale(out: Path) -> list[Path]:
    """Remove relufy temp folders of `out` whose process no longer runs; return what was removed."""
    prefix = f".{out.name}."
    removed = []
    if not out.parent.is_dir():
        return removed
    for entry in out.parent.iterdir():
        name = entry.name
        if not (name.startswith(prefix) and name.endswith(TMP_SUFFIX) and entry.is_dir()):
            continue
        pid = name[len(prefix):-len(TMP_SUFFIX)].split(".")[0]
        if pid.isdigit() and _running(int(pid)):
            continue
        shutil.rmtree(entry, ignore_errors=True)
        removed.append(entry)
    return removed


def _running(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def respect_umask(path: Path) -> None:
    """Give `path` and everything under it the modes a plain `cp` would: 0666/0777 less the umask.

    Libraries that write through a private temp file (safetensors) leave 0600, which other users of
    a shared machine cannot read.
    """
    umask = os.umask(0)
    os.umask(umask)
    paths = [path, *path.rglob("*")] if path.is_dir() else [path]
    for entry in paths:
        if entry.is_symlink():
            continue
        executable = entry.is_dir() or entry.stat().st_mode & 0o111
        entry.chmod((0o777 if executable else 0o666) & ~umask)


def write_text_atomically(path: Path, text: str) -> None:
    """Write a file through a temporary sibling and a rename."""
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_text(text)
        os.replace(tmp, path)
    except OSError as exc:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
        if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
            raise OutputError(f"cannot write {path}: {exc.strerror}; choose a writable location") from None
        raise
