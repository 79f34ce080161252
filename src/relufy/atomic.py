"""Writing outputs so that a failure never leaves a half-written file or folder behind, and so that
nothing the user owns is ever replaced.

Every output folder relufy writes carries a `.relufy-output` marker (JSON: command, version, time),
and every single-file output a signature (a `relufy_output` key in a JSON object, else a last line
`<!-- relufy_output: {...} -->`). `check_output` is the one rule for all commands: an output may not
be, contain or lie inside an input of the command (through symlinks); an existing output is replaced
only with --force and only if relufy wrote it (an empty folder holds nothing to lose).
`output_lock` lets one relufy process at a time write an output: a second one stops with a line
naming the holder's PID and command, instead of racing the first one's rename.

Every complete-or-absent write, file or folder, goes through one temp-name and cleanup rule: it is
built in a hidden sibling named by `temp_sibling` (`.<name>.<pid>.<random>.relufy-tmp`; a folder every
rank of a distributed save writes into is `.<name>.relufy-tmp`, the one name all ranks agree on) and
renamed at the end (`atomic_file`, `atomic_directory`, `replace_with`, `move_into`). Anything that
stops the process on the way (an error, Ctrl-C, SIGTERM: the CLI turns it into KeyboardInterrupt)
removes it (`discard`); one left by a process that was killed outright (kill -9, power loss) is swept
by the next write of the same output, once its process is gone (`sweep_stale`).
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import secrets
import shutil
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path

from . import __version__
from .errors import OutputError, OutputExistsError, OutputInUseError

TMP_SUFFIX = ".relufy-tmp"
MARKER = ".relufy-output"  # in every folder relufy writes: what --force may replace
SIGNATURE_KEY = "relufy_output"  # the same record in a single-file output
LOCK_SUFFIX = ".relufy-lock"
_MAX_SIGNED_BYTES = 64 << 20  # relufy's JSON and markdown outputs are far smaller; a bigger file is not one
_HELD: set[Path] = set()  # outputs this process holds the lock of (a nested writer of the same output)


def output_record(command: str) -> dict:
    """What a marker or signature says: the command that wrote the output, relufy's version, when (UTC)."""
    return {"command": command, "version": __version__,
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds")}


def mark_output(folder: Path, command: str) -> None:
    """Write `folder`'s marker: the record that makes it relufy's output, which --force may replace."""
    write_text_atomically(folder / MARKER, json.dumps(output_record(command)) + "\n")


def signed(content: dict | str, command: str, *, what: str = "the output") -> str:
    """A single-file output's text with its signature: a JSON object gains a `relufy_output` key, other text
    (markdown) a last line `<!-- relufy_output: {...} -->` that renders as nothing. JSON goes through
    `checks.json_text`, which refuses NaN (`what` names the output in that error)."""
    if isinstance(content, dict):
        from .checks import json_text

        return json_text({**content, SIGNATURE_KEY: output_record(command)}, what)
    return content.rstrip("\n") + f"\n\n<!-- {SIGNATURE_KEY}: {json.dumps(output_record(command))} -->\n"


def written_by_relufy(path: Path) -> bool:
    """Whether `path` is an output relufy wrote: a folder with the marker, a file with the signature."""
    if path.is_dir():
        return (path / MARKER).is_file()
    try:
        if path.stat().st_size > _MAX_SIGNED_BYTES:
            return False
        text = path.read_text()
    except (OSError, UnicodeDecodeError):
        return False
    lines = text.rstrip().splitlines()
    if lines and lines[-1].startswith(f"<!-- {SIGNATURE_KEY}: "):
        return True
    try:
        return SIGNATURE_KEY in json.loads(text)
    except (json.JSONDecodeError, TypeError):
        return False


def check_not_input(out: str | os.PathLike, inputs: Iterable) -> None:
    """Refuse an output that is, contains or lies inside one of the command's inputs (symlinks resolved).

    An input that is not a local path (a hub id, a datasets name, None) cannot collide and is skipped.
    """
    out = Path(out).expanduser().resolve()
    for spec in inputs:
        if spec is None or not Path(spec).expanduser().exists():
            continue
        path = Path(spec).expanduser().resolve()
        if out == path:
            raise OutputExistsError(f"{out} is an input of this command; choose another output")
        if path in out.parents:
            raise OutputExistsError(f"{out} is inside the input {path}; choose an output outside it")
        if out in path.parents:
            raise OutputExistsError(f"{out} contains the input {path}; choose an output that does not hold it")


def check_output(path: str | os.PathLike, *, force: bool, inputs: Iterable = (), kind: str = "dir") -> Path:
    """The one output rule of every command; returns the resolved output path.

    `kind` is "dir" for a folder output, "file" for a single file. The output may not touch an input;
    an existing one must be an empty folder, or relufy's own output of the same kind with `force`.
    """
    out = Path(path).expanduser().resolve()
    check_not_input(out, inputs)
    if reason := _refusal(out, force=force, kind=kind):
        raise OutputExistsError(reason)
    return out


def _refusal(out: Path, *, force: bool, kind: str) -> str | None:
    """Why an existing `out` may not be replaced, or None when it may (or does not exist)."""
    if not out.exists() and not out.is_symlink():
        return None
    if out.is_dir() and kind == "dir" and not any(out.iterdir()):
        return None  # an empty folder: nothing to lose
    if out.is_dir() != (kind == "dir"):
        return f"{out} is a {'folder' if out.is_dir() else 'file'}; choose a {kind} path for this output"
    if not written_by_relufy(out):
        what = "holds files relufy did not write" if out.is_dir() else "is a file relufy did not write"
        return f"{out} {what}; choose another output or remove it yourself"
    if not force:
        return f"{out} exists; pass --force to replace it, or choose another output"
    return None


@contextmanager
def claim_output(path: str | os.PathLike, *, command: str, force: bool, inputs: Iterable = (),
                 kind: str = "dir") -> Iterator[Path]:
    """Hold `path`'s lock for the whole `with` block and check it (`check_output`); yield the resolved path."""
    out = Path(path).expanduser().resolve()
    check_not_input(out, inputs)  # before the lock: it creates the output's parent
    with output_lock(out, command):
        yield check_output(out, force=force, inputs=inputs, kind=kind)


@contextmanager
def output_lock(path: str | os.PathLike, command: str) -> Iterator[None]:
    """One relufy process at a time writes `path`: an exclusive lock on `<parent>/.<name>.relufy-lock`, held
    for the `with` block, and beside it the holder's PID and command for a second process's message."""
    from filelock import FileLock, Timeout

    out = Path(path).expanduser().resolve()
    if out in _HELD:
        yield
        return
    lock_file = out.parent / f".{out.name}{LOCK_SUFFIX}"
    holder = lock_file.with_name(lock_file.name + ".pid")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        lock = FileLock(lock_file, timeout=0)
        lock.acquire()
    except Timeout:
        raise OutputInUseError(f"{out} is in use by {_holder(holder)}; wait for it or choose another output") from None
    except PermissionError as exc:
        raise OutputError(f"cannot write {out}: {exc.strerror} in {exc.filename or out.parent}; choose a "
                          "writable output location") from None
    try:
        holder.write_text(json.dumps({"pid": os.getpid(), "command": command}) + "\n")
        _HELD.add(out)
        yield
    finally:
        _HELD.discard(out)
        holder.unlink(missing_ok=True)
        lock.release()


def _holder(holder: Path) -> str:
    """'relufy PID N (command)' from the holder file, or a plainer phrase while it is still being written."""
    try:
        record = json.loads(holder.read_text())
        return f"relufy PID {record['pid']} ({record['command']})"
    except (OSError, ValueError, KeyError, TypeError):
        return "another relufy process"


@contextmanager
def atomic_directory(out: Path, *, replace: bool, command: str) -> Iterator[Path]:
    """Yield a temporary sibling of `out`; on success it becomes `out`, marked as `command`'s output, and on
    failure it vanishes.

    An `out` that exists at the end is replaced only under `check_output`'s rule with `replace` (the
    user's --force): an empty folder, or a folder relufy marked.
    """
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        sweep_stale(out)
        tmp = temp_sibling(out)
        tmp.mkdir()
    except PermissionError as exc:
        raise OutputError(f"cannot write {out}: {exc.strerror} in {exc.filename or out.parent}; choose a "
                          "writable output location") from None
    try:
        yield tmp
        mark_output(tmp, command)
        if reason := _refusal(out, force=replace, kind="dir"):
            raise OutputExistsError(reason)
        replace_with(tmp, out)
    except BaseException:
        discard(tmp)
        raise


def temp_sibling(path: Path, *, shared: bool = False) -> Path:
    """The one name of a temporary that becomes `path`: `.<name>.<pid>.<random>.relufy-tmp` beside it, so
    `sweep_stale` can tell a dead writer's leftover from a live one's. `shared`: `.<name>.relufy-tmp`, for
    a folder every rank of a distributed save writes into (they must agree on it; the main rank empties it
    before the save and removes it after)."""
    if shared:
        return path.with_name(f".{path.name}{TMP_SUFFIX}")
    return path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}{TMP_SUFFIX}")


def discard(tmp: Path) -> None:
    """Remove a temporary file or folder; nothing if it is already gone."""
    if tmp.is_dir() and not tmp.is_symlink():
        shutil.rmtree(tmp, ignore_errors=True)
    else:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)


def replace_with(tmp: Path, target: Path) -> None:
    """The finished temporary folder `tmp` becomes `target` (an older `target` removed first), with the modes
    a plain copy would have (a private temp's 0700 and safetensors' 0600 would outlive the rename)."""
    respect_umask(tmp)
    if target.exists():
        shutil.rmtree(target)
    os.replace(tmp, target)


def move_into(tmp: Path, out_dir: Path, *, last: str = "config.json") -> None:
    """Move every file of the finished temporary folder `tmp` into the existing `out_dir` (replacing files of
    the same name), `last` at the end, so a reader that finds it finds the rest; then remove `tmp`. For a
    model saved into a folder that holds other things (checkpoints, an adapter) and so cannot be replaced."""
    respect_umask(tmp)
    for path in sorted(tmp.iterdir(), key=lambda p: p.name == last):
        os.replace(path, out_dir / path.name)
    tmp.rmdir()


@contextmanager
def atomic_file(path: Path) -> Iterator[Path]:
    """Yield the temporary sibling to write one file into; on success it replaces `path`, on failure it
    vanishes. An unwritable location is one `OutputError`."""
    tmp = temp_sibling(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        sweep_stale(path)
        yield tmp
        os.replace(tmp, path)
    except BaseException as exc:
        discard(tmp)
        if isinstance(exc, OSError) and exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
            raise OutputError(f"cannot write {path}: {exc.strerror}; choose a writable location") from None
        raise


def sweep_stale(out: Path) -> list[Path]:
    """Remove relufy temporaries (files or folders) of `out` whose process no longer runs; return what was
    removed."""
    prefix = f".{out.name}."
    removed = []
    if not out.parent.is_dir():
        return removed
    for entry in out.parent.iterdir():
        name = entry.name
        if not (name.startswith(prefix) and name.endswith(TMP_SUFFIX)):
            continue
        pid = name[len(prefix):-len(TMP_SUFFIX)].split(".")[0]
        if pid.isdigit() and _running(int(pid)):
            continue
        discard(entry)
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
    """Write a text file complete or not at all (`atomic_file`)."""
    with atomic_file(path) as tmp:
        tmp.write_text(text)


def write_json_atomically(path: str | os.PathLike, value) -> None:
    """Write `value` as indented JSON, complete or not at all: a benchmark cut short leaves no half file."""
    write_text_atomically(Path(path), json.dumps(value, indent=2) + "\n")
