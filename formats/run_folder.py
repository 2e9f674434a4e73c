"""
A program's output folder is its own (every program that writes one: the training scripts, eval.py, data.py,
tools/export.py): one run at a time writes it (a lock file), a folder that holds anything is refused unless --resume
continues the run there (training scripts) or --overwrite replaces what the program writes, the folder of an input is
never written, and --resume continues only the run it finds: every setting that defines what is trained must equal
the checkpoint's, and the model, SAEs and tokens must hold what they held (compared by content, not by path). A
divergence stop keeps the newest checkpoint from before it (save_checkpoint keeps the previous one; diverged).

    with run_folder.claim(cfg.out, resume=cfg.resume, overwrite=cfg.overwrite, checkpoint="ckpt.pt",
                          outputs=("ckpt.pt", "adapter", "results.json"), config=asdict(cfg), may_change=MAY_CHANGE,
                          inputs=[cfg.model, *cfg.sae, cfg.data], by_content=("model", "sae", "data")):
        ...  # the run

The lock is `.lock` in the folder, holding the pid and host of the run, with an fcntl.flock on it for as long as the
run lives: the kernel drops the flock when the process dies (kill -9 included), so a lock left by a killed run is
free and the next run takes it over; a lock whose flock is held belongs to a live run and is refused.
"""
from __future__ import annotations

import fcntl
import fnmatch
import glob
import os
import re
import shutil
import socket

from plumbing import common
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


def claim(folder: str, *, resume: bool = False, overwrite: bool, checkpoint: str | None = None,
          outputs: tuple[str, ...], config: dict | None = None, may_change: frozenset[str] = frozenset(),
          flag: str = "--out", master: bool | None = None, inputs=(), by_content=(), may_lower=()) -> Claim:
    """Check `folder` before any work and lock it for this run; a ValueError line says what is wrong and what to type.
    The one rule of every program that writes a folder (the training scripts, eval.py, data.py, tools/export.py):
    a new or empty folder is written; one that holds anything is refused unless --overwrite (or --resume, where the
    program has a checkpoint to continue); a file, or a folder the program reads (`inputs`), is never written.

    checkpoint: the file --resume continues from (None: the program does not resume); outputs: every name (glob) the
    script writes there, removed by --overwrite (nothing else in the folder is touched); inputs: the files and folders
    the run reads; config: this run's settings, compared with the checkpoint's on --resume except for the fields in
    may_change, those in by_content (the inputs, compared by what their files hold: check_inputs) and those in
    may_lower (lower than the checkpoint's is allowed: --lr after a divergence)."""
    master = int(os.environ.get("RANK", "0")) == 0 if master is None else master
    if os.path.isfile(folder):  # before reading it as an input's folder
        raise ValueError(f"{flag} {folder} is a file, not a folder: choose a folder")
    not_an_input(folder, inputs, outputs, flag)
    created = not os.path.exists(folder)
    writable(folder, flag)
    lock = _lock(folder, flag, created) if master else Claim(folder, None)
    try:
        if master:
            remove_stale_temp_files(folder)
        held = sorted(n for n in os.listdir(folder) if n != LOCK and not _TMP.fullmatch(n))
        ckpt = os.path.join(folder, checkpoint) if checkpoint else None
        if overwrite and resume:
            raise ValueError("--resume continues the run in the folder, --overwrite replaces it: give one of them")
        if resume and ckpt and os.path.isfile(ckpt):
            check_resume(ckpt, config, may_change, by_content, may_lower)
        elif resume and held:
            raise ValueError(f"--resume: {flag} {folder} holds no {checkpoint} to continue but other files "
                             f"({_names(held)}): --overwrite to replace them, or choose another {flag}")
        elif overwrite and master:
            for pattern in outputs:
                for path in glob.glob(os.path.join(glob.escape(folder), pattern)):
                    shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)
        elif held and not overwrite and not resume and checkpoint:
            raise ValueError(f"{flag} {folder} already holds a run's output ({_names(held)}): add --resume to "
                             f"continue it, --overwrite to replace it, or choose another {flag}")
        elif held and not overwrite:
            raise ValueError(f"{flag} {folder} already holds files ({_names(held)}): --overwrite replaces what this "
                             f"program writes there ({', '.join(outputs)}) and keeps the rest, or choose another "
                             f"{flag}")
    except BaseException:
        lock.release()
        raise
    return lock


def not_an_input(folder: str, inputs, outputs: tuple[str, ...], flag: str = "--out"):
    """One ValueError line if the run would write over what it reads: `folder` is the folder of one of `inputs` (a
    file's folder, or the folder itself), or an input lies at a name the run writes in `folder` (`outputs`)."""
    here = os.path.realpath(folder)
    for path in inputs:
        if not path or not os.path.exists(path):  # a hub id, or nothing: nothing local to protect
            continue
        real = os.path.realpath(path)
        home = real if os.path.isdir(real) else os.path.dirname(real)
        if home == here:
            raise ValueError(f"{flag} {folder} is the folder of the input {path}: writing there would replace what "
                             f"the run reads; choose another {flag}")
        rel = os.path.relpath(real, here)
        if not rel.startswith(os.pardir) and any(fnmatch.fnmatch(rel.split(os.sep)[0], p) for p in outputs):
            raise ValueError(f"{flag} {folder} holds the input {path} where the run writes its own output "
                             f"({rel.split(os.sep)[0]}); copy the input elsewhere, or choose another {flag}")


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


def check_resume(ckpt: str, config: dict, may_change: frozenset[str], by_content=(), may_lower=()):
    """One ValueError line naming every setting that differs from the checkpoint's saved config (old and new), except
    those in may_change, those in may_lower when lower than the checkpoint's, and the inputs in by_content when the
    checkpoint recorded what their files hold (check_inputs compares that once the run has found them; a checkpoint
    from before that record compares their paths, resolved)."""
    state = disk.torch_load(ckpt, "cpu")
    saved = state.get("config") if isinstance(state, dict) else None
    if saved is None:
        raise ValueError(f"--resume: {ckpt} holds no config to check the settings against; --overwrite to start over")
    recorded = state.get("inputs") or {}
    skip = set(may_change) | {k for k in by_content if k in recorded}
    lowered = {k for k in may_lower if _lower(config.get(k), saved.get(k), state.get("effective", {}).get(k))}
    diff = changes({k: _resolved(v) if k in by_content else v for k, v in saved.items()},
                   {k: _resolved(v) if k in by_content else v for k, v in config.items()}, frozenset(skip | lowered))
    for k in by_content:  # what the inputs hold, whatever their paths
        if k in recorded and config.get(k) is not None:
            now = inputs_of(**{k: config[k]}).get(k)
            if _norm_prints(now) != _norm_prints(recorded[k]):
                same = _resolved(saved.get(k)) == _resolved(config[k])
                diff.append(f"--{k.replace('_', '-')} {_text(saved.get(k))} -> {_text(config[k])}"
                            + (" (same path, other content)" if same else " (other content)"))
    if diff:
        lower = [k for k in may_lower if any(d.startswith(f"--{k.replace('_', '-')} ") for d in diff)]
        why = f" (only a lower {', '.join('--' + k.replace('_', '-') for k in lower)} may be given)" if lower else ""
        raise ValueError(f"--resume: {ckpt} was trained with other settings: {'; '.join(diff)} (checkpoint -> now)"
                         f"{why}: give the checkpoint's values to continue it, or --overwrite / another --out for a "
                         f"new run")


def _lower(now, saved, effective) -> bool:
    """A number below the checkpoint's (its `effective` value where the config left it to a rule: --lr none)."""
    old = saved if saved is not None else effective
    return isinstance(now, (int, float)) and isinstance(old, (int, float)) and now < old


def _resolved(v):
    """A path as the file it names (absolute, links followed), for comparing checkpoints that predate check_inputs."""
    if isinstance(v, (list, tuple)):
        return [_resolved(x) for x in v]
    return os.path.realpath(v) if isinstance(v, str) and os.path.exists(v) else v


# ----------------------------------------------------------------------------------------------------------------------
# What a run is built from, by content: --resume continues only with the same model, SAEs and tokens, whatever path
# or cache name names them (a cache folder renamed, an SAE given by absolute instead of relative path), and refuses
# other files at the same path (an SAE retrained in place)


def fingerprints(files: list[str]) -> list[list[str]]:
    """[[file name, disk.fingerprint], ...] of the files an input is read from, sorted: what check_inputs compares."""
    return sorted([os.path.basename(f), _fingerprint(f)] for f in files)


_SEEN: dict = {}


def _fingerprint(path: str) -> str:
    """disk.fingerprint, once per file version in a process (the claim and the run both ask)."""
    st = os.stat(path)
    key = (os.path.realpath(path), st.st_size, st.st_mtime_ns, st.st_ino)
    if key not in _SEEN:
        _SEEN[key] = disk.fingerprint(path)
    return _SEEN[key]


def inputs_of(**given) -> dict:
    """{flag: fingerprints} of what a run reads: `model` (a model folder, hub id or GGUF file: the files it resolves
    to), `sae` / `init` (SAE paths, local or hub; a list: one entry per SAE) and `data` (a token folder). None: not
    given."""
    from formats import checkpoint, sae_files
    out = {}
    for key, value in given.items():
        if value is None or value == "" or value == []:
            continue
        if key == "model":
            out[key] = fingerprints(checkpoint.model_files(checkpoint.resolve_model_dir(value)))
        elif key == "data":
            out[key] = fingerprints([os.path.join(value, n) for n in ("meta.json", "train.bin", "val.bin")
                                     if os.path.isfile(os.path.join(value, n))])
        elif isinstance(value, (list, tuple)):
            out[key] = [fingerprints(sae_files.files_of(v)) for v in value]
        else:
            out[key] = fingerprints(sae_files.files_of(value))
    return out


def check_inputs(recorded: dict | None, now: dict, ckpt: str):
    """--resume: one ValueError line for the first input (flag -> fingerprints) whose files hold other content than
    the checkpoint recorded when its run began. A checkpoint without a record (older) passes: check_resume compared
    its paths."""
    for key, prints in now.items():
        if recorded and key in recorded and _norm_prints(recorded[key]) != _norm_prints(prints):
            old, new = _norm_prints(recorded[key]), _norm_prints(prints)
            what = [n for n, _ in new if [n, dict(new)[n]] not in old] or [n for n, _ in old]
            raise ValueError(f"--resume: the files of --{key.replace('_', '-')} ({', '.join(what[:3])}) hold other "
                             f"content than when {ckpt} was trained (same path or not, it is not the same input): "
                             f"give the run's own {key.replace('_', ' ')}, or --overwrite / another --out for a new "
                             f"run")


def _norm_prints(p):
    if p and isinstance(p[0], list) and p[0] and isinstance(p[0][0], list):  # several inputs (--sae): a multiset
        return sorted(sorted(map(list, x)) for x in p)
    return sorted(map(list, p or []))


def check_tensors(saved: list, params: list, ckpt: str, what: str = "adapter"):
    """--resume: the checkpoint's tensors fit the run's parameters in count and shape, or one ValueError line."""
    if len(saved) != len(params):
        raise ValueError(f"--resume: {ckpt} holds {len(saved)} {what} tensors, this run has {len(params)}: it is "
                         f"another run's or damaged; --overwrite to start over")
    for i, (t, p) in enumerate(zip(saved, params)):
        shape = tuple(p.shape)  # a DTensor's shape is the whole tensor's
        if not hasattr(t, "shape") or tuple(t.shape) != shape:
            raise ValueError(f"--resume: {ckpt}: {what} tensor {i} has shape {tuple(getattr(t, 'shape', ()))}, this "
                             f"run's has {shape}: it is another run's or damaged; --overwrite to start over")


# ----------------------------------------------------------------------------------------------------------------------
# Checkpoints that survive a divergence: the previous one is kept beside the newest, and a stop names the newest one
# from before the divergence


def previous(path: str) -> str:
    root, ext = os.path.splitext(path)
    return f"{root}.prev{ext}"


def save_checkpoint(obj: dict, path: str):
    """disk.torch_save, keeping the checkpoint it replaces as previous(path): a state whose loss turns out
    non-finite at the next step still has one from before it. At every moment `path` is a whole checkpoint."""
    if os.path.isfile(path):
        tmp = previous(path) + f".tmp{os.getpid()}"
        os.link(path, tmp) if hasattr(os, "link") else shutil.copyfile(path, tmp)
        os.replace(tmp, previous(path))
    disk.torch_save(obj, path)


def finish(path: str):
    """The run ended well: the previous checkpoint kept against a divergence is not needed any more."""
    if os.path.isfile(previous(path)):
        os.remove(previous(path))


def diverged(path: str, bad_step: int, what: str, advice: str, master: bool = True) -> FloatingPointError:
    """The error that ends a run whose state after `bad_step` updates is not finite (a loss or a weight): the newest
    checkpoint from before it is left as `path` (the previous one restored where the newest holds the bad state; a
    bad one with nothing before it removed; by rank 0), and the line names it with `advice` (what to change on
    --resume)."""
    def step_of(p):
        return disk.torch_load(p, "cpu").get("step") if os.path.isfile(p) else None
    now, prev = step_of(path), step_of(previous(path))
    if not master:  # rank 0 alone touches the files
        pass
    elif now is not None and now >= bad_step and prev is not None and prev < bad_step:
        os.replace(previous(path), path)
        now = prev
    elif now is not None and now >= bad_step:
        os.remove(path)
        now = None
    if now is None:
        return FloatingPointError(f"{what} (the state after {bad_step} steps); no checkpoint from before it was "
                                  f"written: start again with {advice} (--overwrite, if the run left files)")
    return FloatingPointError(f"{what} (the state after {bad_step} steps); {path} holds the state after {now} steps, "
                              f"from before it: continue from it with --resume and {advice}")


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
