"""Atomic writes: an output appears whole or not at all, and an earlier result is never half-replaced.

Everything is written into a temporary sibling of the target and renamed over it at the end (a
rename within one folder is atomic on POSIX). An existing target is replaced only when the caller
says so (`force`, i.e. the CLIs' --force); the old one is moved aside first and deleted only after
the new one is in place. A crash or an exception leaves the target as it was.

A temporary is hidden (a dot name) and carries its writer's host and pid, `.NAME.tmp-HOST-PID.xxxx`:
a process killed mid-write (kill -9, OOM) cannot remove it, so the next write of the same target
removes those whose process on this host is gone -- a killed merged export leaves no gigabytes behind.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from .errors import ShearsError

REPLACE_HINT = "pass --force to replace it, or choose another output"
HOST = socket.gethostname()
# mkstemp/mkdtemp create 0600/0700 (a temporary must not be readable by others); the output they become
# gets what open()/mkdir() would have given it, so a run folder is shared the way the user's umask says.
_UMASK = os.umask(0o022)
os.umask(_UMASK)


def _prefix(target: Path, kind: str) -> str:
    return f".{target.name}.{kind}-{HOST}-{os.getpid()}."


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def remove_stale_temporaries(target: str | os.PathLike) -> None:
    """Delete the temporaries of `target` left by killed writers on this host (live writers' are kept)."""
    target = Path(target)
    pattern = re.compile(rf"\.{re.escape(target.name)}\.(tmp|old)-{re.escape(HOST)}-(\d+)\.")
    if not target.parent.is_dir():
        return
    for entry in target.parent.iterdir():
        match = pattern.match(entry.name)
        if match and not _alive(int(match.group(2))):
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry, ignore_errors=True)
            else:
                entry.unlink(missing_ok=True)


def refuse_existing(path: str | os.PathLike, force: bool, hint: str = REPLACE_HINT) -> None:
    if Path(path).exists() and not force:
        raise ShearsError(f"{path} already exists: {hint}")


def _prepare(out: str | os.PathLike, force: bool, hint: str) -> Path:
    """Refuse an existing `out` unless `force`, make its folder, clear temporaries a killed write left."""
    out = Path(out)
    refuse_existing(out, force, hint)
    out.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(out)
    return out


@contextmanager
def atomic_folder(out: str | os.PathLike, force: bool = False, hint: str = REPLACE_HINT) -> Iterator[Path]:
    """Yield an empty temporary folder; when the block ends without error it becomes `out`."""
    out = _prepare(out, force, hint)
    tmp = Path(tempfile.mkdtemp(prefix=_prefix(out, "tmp"), dir=out.parent))
    try:
        yield tmp
        os.chmod(tmp, 0o777 & ~_UMASK)
        if out.exists():
            old = Path(tempfile.mkdtemp(prefix=_prefix(out, "old"), dir=out.parent))
            os.replace(out, old / out.name)
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


@contextmanager
def atomic_file(path: str | os.PathLike, force: bool = True, hint: str = REPLACE_HINT) -> Iterator[Path]:
    """Yield a temporary file path (same folder and suffix); when the block ends it becomes `path`."""
    path = _prepare(path, force, hint)
    handle, tmp = tempfile.mkstemp(prefix=_prefix(path, "tmp"), suffix=path.suffix, dir=path.parent)
    os.close(handle)
    try:
        yield Path(tmp)
        os.chmod(tmp, 0o666 & ~_UMASK)
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)


def write_text(path: str | os.PathLike, text: str, force: bool = True, hint: str = REPLACE_HINT) -> Path:
    with atomic_file(path, force, hint) as tmp:
        tmp.write_text(text)
    return Path(path)


def write_json(path: str | os.PathLike, value: Any, force: bool = True, hint: str = REPLACE_HINT,
               indent: int = 1) -> Path:
    return write_text(path, json.dumps(value, indent=indent) + "\n", force, hint)
