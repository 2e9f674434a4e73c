"""
A training run's output folder is its own: one run at a time writes it (a lock file), a folder that holds another
run's output is refused unless --resume continues that run or --overwrite replaces it, and --resume continues only
the run it finds (every setting that defines what is trained must equal the checkpoint's).

    with run_folder.claim(cfg.out, resume=cfg.resume, overwrite=cfg.overwrite, checkpoint="ckpt.pt",
                          outputs=("ckpt.pt", "adapter", "results.json"), config=asdict(cfg), may_change=MAY_CHANGE):
        ...  # the run

The lock is `.lock` in the folder, holding the pid and host of the run, with an fcntl.flock on it for as long as the
run lives: the kernel drops the flock when the process dies (kill -9 included), so a lock left by a killed run is
free and the next run takes it over; a lock whose flock is held belongs to a live run and is refused.
"""
from __future__ import annotations

import fcntl
import glob
import os
import re
import shutil
import socket

import common
from formats import disk

LOCK = ".lock"
_TMP = re.compile(r".*\.tmp\d+(\.[^/]*)?$")  # disk.atomic_path's temporary names: <name>.tmp<pid><ext>


class Claim:
    """The held lock of one run folder (none on ranks other than 0: torchrun's processes share rank 0's)."""

    def __init__(self, folder: str, fd: int | None, created: bool = False):
        self.folder, self.fd, self.created = folder, fd, created

    def release(self):
        if self.fd is None:
            return
        path = os.path.join(self.folder, LOCK)
        try:  # unlink only our own lock file (not one another run made after a takeover)
            if os.stat(path).st_ino == os.fstat(self.fd).st_ino:
                os.remove(path)
        except OSError:
            pass
        os.close(self.fd)
        self.fd = None
        if self.created:  # a run that ended before writing anything leaves no empty folder behind
            try:
                os.rmdir(self.folder)
            except OSError:
                pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.release()


def claim(folder: str, *, resume: bool, overwrite: bool, checkpoint: str, outputs: tuple[str, ...], config: dict,
          may_change: frozenset[str], flag: str = "--out", master: bool | None = None) -> Claim:
    """Check `folder` before any work and lock it for this run; a ValueError line says what is wrong and what to type.

    checkpoint: the file --resume continues from; outputs: every name (glob) the script writes there, removed by
    --overwrite (nothing else in the folder is touched); config: this run's settings, compared with the checkpoint's
    on --resume except for the fields in may_change."""
    master = int(os.environ.get("RANK", "0")) == 0 if master is None else master
    created = not os.path.exists(folder)
    writable(folder, flag)
    lock = _lock(folder, flag, created) if master else Claim(folder, None)
    try:
        if master:
            remove_stale_temp_files(folder)
        held = sorted(n for n in os.listdir(folder) if n != LOCK and not _TMP.fullmatch(n))
        ckpt = os.path.join(folder, checkpoint)
        if overwrite and resume:
            raise ValueError("--resume continues the run in the folder, --overwrite replaces it: give one of them")
        if resume and os.path.isfile(ckpt):
            check_resume(ckpt, config, may_change)
        elif resume and held:
            raise ValueError(f"--resume: {flag} {folder} holds no {checkpoint} to continue but other files "
                             f"({_names(held)}): --overwrite to replace them, or choose another {flag}")
        elif overwrite and master:
            for pattern in outputs:
                for path in glob.glob(os.path.join(glob.escape(folder), pattern)):
                    shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)
        elif held and not overwrite and not resume:
            raise ValueError(f"{flag} {folder} already holds a run's output ({_names(held)}): add --resume to "
                             f"continue it, --overwrite to replace it, or choose another {flag}")
    except BaseException:
        lock.release()
        raise
    return lock


def writable(folder: str, flag: str = "--out"):
    """`folder` exists (created if need be) as a folder this process can write, or one ValueError line."""
    if os.path.exists(folder) and not os.path.isdir(folder):
        raise ValueError(f"{flag} {folder} is a file, not a folder: choose a folder")
    try:
        os.makedirs(folder, exist_ok=True)
    except OSError as e:
        raise ValueError(f"{flag} {folder}: cannot create the folder ({e.strerror}): choose a writable "
                         f"folder") from None
    if not os.access(folder, os.W_OK | os.X_OK):
        raise ValueError(f"{flag} {folder}: the folder is not writable: choose a writable folder")


def _lock(folder: str, flag: str, created: bool = False) -> Claim:
    path = os.path.join(folder, LOCK)
    for _ in range(10):  # retried only when another run removed or replaced the file between open and flock
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise ValueError(f"{flag} {folder}: cannot write a lock file there ({e.strerror}): choose a writable "
                             f"folder") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 200).decode(errors="replace").split()
            os.close(fd)
            who = f"pid {holder[0]} on {holder[1]}" if len(holder) >= 2 else "another process"
            raise ValueError(f"{flag} {folder} is in use by another run ({who}): wait for it to end, or choose "
                             f"another {flag}") from None
        try:
            same = os.stat(path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if not same:
            os.close(fd)
            continue
        # free: no lock file, or one left by a run that died (its flock went with it): ours now
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()} {socket.gethostname()}\n".encode())
        return Claim(folder, fd, created)
    raise ValueError(f"{flag} {folder}: could not take the lock {path} (other runs keep replacing it)")


def remove_stale_temp_files(folder: str) -> list[str]:
    """Temporary files of disk.atomic_path (<name>.tmp<pid><ext>) that a killed run left in the folder or one level
    below (adapter/, ckpt_010/, ...): with the lock held, no live run is writing them."""
    removed = []
    for path in glob.glob(os.path.join(glob.escape(folder), "*")) + glob.glob(os.path.join(glob.escape(folder), "*",
                                                                                            "*")):
        if _TMP.fullmatch(os.path.basename(path)) and os.path.isfile(path):
            os.remove(path)
            removed.append(path)
    if removed:
        common.log(f"{folder}: removed {len(removed)} temporary file(s) a killed run left ({_names(removed)})")
    return removed


def check_resume(ckpt: str, config: dict, may_change: frozenset[str]):
    """One ValueError line naming every setting that differs from the checkpoint's saved config (old and new), except
    those in may_change."""
    saved = disk.torch_load(ckpt, "cpu").get("config")
    if saved is None:
        raise ValueError(f"--resume: {ckpt} holds no config to check the settings against; --overwrite to start over")
    diff = changes(saved, config, may_change)
    if diff:
        raise ValueError(f"--resume: {ckpt} was trained with other settings: {'; '.join(diff)} (checkpoint -> now): "
                         f"give the checkpoint's values to continue it, or --overwrite / another --out for a new run")


def changes(saved: dict, config: dict, may_change: frozenset[str]) -> list[str]:
    """'--flag old -> new' for every field of `config` outside may_change whose value differs from `saved`'s (fields
    the checkpoint predates are not compared)."""
    return [f"--{k.replace('_', '-')} {_text(saved[k])} -> {_text(v)}" for k, v in config.items()
            if k not in may_change and k in saved and _norm(saved[k]) != _norm(v)]


def _norm(v):
    return list(v) if isinstance(v, tuple) else v


def _text(v) -> str:
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(map(str, v)) + "]"
    return "none" if v is None else str(v)


def _names(names: list[str], n: int = 4) -> str:
    names = [os.path.basename(p) for p in names]
    return ", ".join(names[:n]) + (f" and {len(names) - n} more" if len(names) > n else "")
