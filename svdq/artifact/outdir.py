"""The output folder of a run: refuse what would be lost, lock it, clean what dead runs left.

A run that writes folder OUT holds `.OUT.lock` beside it (the writer's pid and process start
time) from its first check to its last rename, so a second run into OUT refuses at start
instead of after its work. Everything a writer makes beside OUT is named `.OUT.*`: the
temporary `.OUT.<random>.partial` it fills, and `.OUT.old-<pid>`, the previous artifact while
it is swapped out. Whoever takes the lock from a dead run removes what that run left, and puts
a swapped-out previous artifact back first, so after any crash OUT holds the previous artifact
or nothing, never a half-written one.
"""
from __future__ import annotations

import contextlib
import errno
import os
import shutil
from pathlib import Path
from typing import Iterator

from svdq.errors import SvdqError

MANIFEST = "svdq.json"  # what marks a folder as an svdq artifact (runtime.MANIFEST)
EXPORT = "svdq_export.json"  # what marks a folder `svdq export` wrote
_held: dict[Path, int] = {}  # locks this process holds, and how often it entered each


def apart(source: Path, out: Path, what: str) -> None:
    """Refuse an output that is the input artifact `source`, inside it or around it (writing
    it would replace what is being read); `what`: the output in words."""
    here, there = Path(source).resolve(), Path(out).resolve()
    if there == here or here in there.parents or there in here.parents:
        raise SvdqError(f"-o {out} is the artifact, inside it or around it; write {what} to a "
                        "folder of its own")


def check(out: Path, overwrite: bool) -> None:
    """Refuse, before any work is done, an output that would clobber something not ours."""
    if out.exists() and not out.is_dir():
        raise SvdqError(f"{out} exists and is not a folder; choose another -o")
    if not out.is_dir():
        return
    try:
        entries = sorted(p.name for p in out.iterdir())
    except PermissionError:
        raise SvdqError(f"{out} cannot be read (permission denied); choose another -o") from None
    if not entries:
        return
    if not overwrite:
        raise SvdqError(f"{out} exists and is not empty; pass --overwrite or choose another -o")
    if MANIFEST not in entries and EXPORT not in entries:
        raise SvdqError(f"{out} holds files that are not an svdq artifact (no {MANIFEST}, e.g. "
                        f"{entries[0]!r}); --overwrite only replaces artifacts and exports: empty "
                        "it yourself or choose another -o")


def _start_time(pid: int) -> str:
    """The process's start time (clock ticks since boot) where /proc has it, else ''."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[19]
    except (OSError, IndexError):
        return ""


def _alive(stamp: str) -> bool:
    """Does the process that wrote `stamp` ('pid start-time') still run? A reused pid is not it."""
    parts = stamp.split()
    if not parts or not parts[0].isdigit():
        return False
    pid = int(parts[0])
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        pass
    started = parts[1] if len(parts) > 1 else ""
    return not started or not _start_time(pid) or _start_time(pid) == started


def lock_path(out: Path) -> Path:
    return out.parent / f".{out.name}.lock"


def _leftovers(out: Path) -> list[Path]:
    return sorted(p for p in out.parent.glob(f".{out.name}.*")
                  if p.name.endswith(".partial") or ".old-" in p.name)


def clean_dead(out: Path) -> list[Path]:
    """Remove what dead runs into `out` left beside it; a swapped-out artifact goes back first.
    Call only while holding the lock (no live writer then uses these names)."""
    removed = []
    for p in _leftovers(out):
        if ".old-" in p.name and not out.exists() and (p / MANIFEST).is_file():
            p.rename(out)  # died between moving the previous artifact aside and the new one in
            continue
        shutil.rmtree(p, ignore_errors=True)
        removed.append(p)
    return removed


@contextlib.contextmanager
def locked(out: Path) -> Iterator[None]:
    """Hold the lock on output folder `out` (re-entrant in one process)."""
    out = Path(os.path.abspath(out))
    if out in _held:
        _held[out] += 1
        try:
            yield
        finally:
            _held[out] -= 1
        return
    lock = lock_path(out)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise SvdqError(f"cannot create {out.parent} ({e.strerror}); choose another -o") from None
    stamp = f"{os.getpid()} {_start_time(os.getpid())}"
    for _ in range(2):
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            try:
                other = lock.read_text()
            except FileNotFoundError:
                continue  # released meanwhile
            if _alive(other):
                raise SvdqError(f"another svdq run (pid {other.split()[0]}) is writing {out}; "
                                "wait for it to finish or choose another -o") from None
            lock.unlink(missing_ok=True)  # a dead run's: take it over
            continue
        except PermissionError:
            raise SvdqError(f"cannot write in {out.parent} (permission denied); choose another "
                            "-o") from None
        with os.fdopen(fd, "w") as f:
            f.write(stamp)
        break
    else:
        raise SvdqError(f"cannot lock {out} ({lock} keeps reappearing); try again")
    _held[out] = 1
    try:
        clean_dead(out)
        yield
    finally:
        del _held[out]
        lock.unlink(missing_ok=True)


def publish_modes(folder: Path) -> None:
    """Give `folder` and what is in it the modes the user's umask asks for (mkdtemp makes 0700)."""
    mask = os.umask(0)
    os.umask(mask)
    for p in [folder, *folder.rglob("*")]:
        full = 0o777 if p.is_dir() else 0o666
        os.chmod(p, full & ~mask, follow_symlinks=False)


def check_space(folder: Path, needed: int) -> None:
    """Refuse before writing when the disk under `folder` cannot hold `needed` bytes."""
    free = shutil.disk_usage(folder).free
    if free < needed:
        raise SvdqError(f"the artifact needs about {needed / 1e6:,.1f} MB but {folder} has only "
                        f"{free / 1e6:,.1f} MB free; free some space or choose another -o")


def folder_bytes(folder: Path) -> int:
    """The bytes of the files under `folder`, as far as they can be read (0 where it is gone)."""
    try:
        return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())
    except OSError:
        return 0


def disk_full(e: BaseException) -> bool:
    """Whether `e` says a write ran out of disk (or of quota)."""
    return ((isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT))
            or "No space left" in str(e) or "Disk quota" in str(e))


def no_space(e: BaseException, folder: Path, needed: int) -> SvdqError | None:
    """The one-line error for a write that ran out of disk, or None for any other failure."""
    if disk_full(e):
        return SvdqError(f"the disk under {folder} filled up while writing the artifact and its "
                         f"scratch files (at least {needed / 1e6:,.1f} MB needed); nothing was "
                         "written: free some space or choose another -o")
    return None

