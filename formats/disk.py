"""Files a run writes and reads back: atomic writes (a crash mid-write never leaves a truncated file; the old one stays
until the new one is complete), JSON with NaN as null, torch checkpoints with one-line errors."""
from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import math
import os

import torch


@contextlib.contextmanager
def atomic_path(path: str):
    """Yields a temporary name beside `path`; renamed over `path` when the block ends without error, else removed."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    root, ext = os.path.splitext(path)
    tmp = f"{root}.tmp{os.getpid()}{ext}"  # keeps the extension: savefig and friends pick the format from it
    try:
        yield tmp
        os.replace(tmp, path)
    except Exception as e:  # a full disk: one line naming the folder (common.cli), the old file kept
        if full_disk(e, path):
            raise DiskFull(path) from None
        raise
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


class DiskFull(OSError):
    """No space left where a file was being written: a user error of one line (common.USER_ERRORS)."""

    def __init__(self, path: str):
        folder = os.path.dirname(os.path.abspath(path))
        super().__init__(errno.ENOSPC, f"no space left on the disk of {folder} while writing {os.path.basename(path)} "
                                       f"(the previous version of the file, if any, is kept): free space there, or "
                                       f"choose another folder")

    def __str__(self):
        return self.strerror


def full_disk(e: BaseException, path: str) -> bool:
    """Whether `e`, raised while writing `path`, says the disk is full: ENOSPC / EDQUOT, or the RuntimeError torch.save
    and safetensors raise for a failed write when the disk has (nearly) no space left."""
    if isinstance(e, DiskFull):
        return False
    if getattr(e, "errno", None) in (errno.ENOSPC, errno.EDQUOT) or "No space left" in str(e):
        return True
    return "writ" in str(e).lower() and _nearly_full(path)


def _nearly_full(path: str, margin: int = 64 << 20) -> bool:
    try:
        import shutil
        return shutil.disk_usage(os.path.dirname(os.path.abspath(path))).free < margin
    except OSError:
        return False


def write_text(path: str, text: str):
    with atomic_path(path) as tmp, open(tmp, "w") as f:
        f.write(text)


def write_json(path: str, obj, indent: int = 2):
    write_text(path, json.dumps(obj, indent=indent))


def read_json(path: str, missing: str):
    """A JSON file's content, or one FileNotFoundError line (`missing`: what the folder is not, what to do)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(missing)
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: not valid JSON ({e}); restore or rewrite the file") from None


def torch_save(obj, path: str):
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)


def torch_load(path: str, device, what: str = "checkpoint", keys: tuple[str, ...] = ()):
    """torch.load with a one-line error for a truncated or foreign file (instead of torch's zip-reader message), and
    for one that lacks any of `keys` (a checkpoint of another script or version: resuming it would fail part way)."""
    try:
        obj = torch.load(path, map_location=device, weights_only=False)
    except (RuntimeError, EOFError, OSError, ValueError) as e:
        raise ValueError(f"{path}: unreadable {what} ({str(e).splitlines()[0]}); delete it to start over, or restore "
                         f"a good copy") from None
    missing = [k for k in keys if not isinstance(obj, dict) or k not in obj]
    if missing:
        raise ValueError(f"{path}: not a complete {what} of this script (no {', '.join(map(repr, missing))}); "
                         f"--overwrite to start over, or restore a good copy")
    return obj


def fingerprint(path: str, whole: int = 64 << 20, piece: int = 1 << 20) -> str:
    """What a file holds, cheaply: its size and the sha256 of all of it up to `whole` bytes, of its first and last
    `piece` bytes and 14 pieces evenly spread between them beyond that (a 10 GB safetensors file costs 16 MB of
    reading; its header, with every tensor's name, dtype and shape, is in the first piece). A file retrained or
    replaced differs everywhere; an edit confined to bytes no piece covers is not seen."""
    size = os.path.getsize(path)
    h = hashlib.sha256()
    with open(path, "rb") as f:
        if size <= whole:
            for block in iter(lambda: f.read(1 << 24), b""):
                h.update(block)
        else:
            for i in range(16):
                f.seek((size - piece) * i // 15)
                h.update(f.read(piece))
    return f"{size}:{h.hexdigest()[:32]}"


def jsonable(o):
    """numpy scalars as Python numbers, NaN (an undefined ratio) as null: what json.dumps can write."""
    import numpy as np
    if isinstance(o, dict):
        return {k: jsonable(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [jsonable(v) for v in o]
    if isinstance(o, (np.floating, float)):
        return float(o) if math.isfinite(o) else None
    if isinstance(o, np.integer):
        return int(o)
    return o


def cache_dir() -> str:
    """Where what is built on first use is cached: the offline corpus, the tiny model and its SAE, converted GGUF files (under out/, with every other output)."""
    return os.environ.get("LORASAE_CACHE") or os.path.join("out", "cache")
