"""What every script shares: the CLI (flags and help from a dataclass), one-line user errors, rank-0 logging, the
precision and peak FLOPs of a device, the learning-rate schedule and the random state of a step (torchrun's processes
and collectives: plumbing/distributed.py). A student may skip this file: none of it is the method."""
from __future__ import annotations

import argparse
import dataclasses
import inspect
import functools
import math
import os
import re
import sys
import time
import typing

import torch
import torch.distributed as dist

from formats import disk
from plumbing import distributed

# ----------------------------------------------------------------------------------------------------------------------
# Command line: every dataclass field is a --flag; its help is the comment beside the field


def field_help(config_cls) -> dict[str, str]:
    """The comment after each field (and comment lines right below it) in the dataclass source: one place to
    document a flag, read by --help."""
    helps, current = {}, None
    for cls in reversed(config_cls.__mro__[:-1]):
        for line in inspect.getsource(cls).splitlines():
            m = re.match(r"\s+(\w+)\s*:[^#]*?(?:#\s*(.*))?$", line)
            if m and not line.strip().startswith(("#", "def ", "@", '"')):
                current = m.group(1)
                helps[current] = (m.group(2) or "").strip()
            elif line.strip().startswith("#") and current is not None:
                helps[current] += " " + line.strip().lstrip("#").strip()
            else:
                current = None
    return helps


def parse_args(config_cls, argv=None, epilog: str | None = None):
    """(config, typed): `--layer 12 --rank 64` override the defaults; `typed` is the set of fields the user gave, so
    that a preset fills only the others (whatever value a typed flag has)."""
    helps = field_help(config_cls)
    parser = _Parser(description=(config_cls.__doc__ or "").strip(), epilog=epilog,
                                     formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False)
    hints = typing.get_type_hints(config_cls)
    for f in dataclasses.fields(config_cls):
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        flags = ["--" + f.name.replace("_", "-")] + (["--" + f.name] if "_" in f.name else [])  # both spellings
        kind, args = hints[f.name], typing.get_args(hints[f.name])
        text = f"{helps.get(f.name, '')} (default: {default})".strip().replace("%", "%%")  # argparse formats help
        if kind is bool:
            parser.add_argument(*flags, type=_parse_bool, nargs="?", const=True, metavar="BOOL", help=text,
                                default=argparse.SUPPRESS)
        elif typing.get_origin(kind) is list:
            parser.add_argument(*flags, action="append", type=args[0], metavar=args[0].__name__.upper(),
                                help=text + "; repeat for several", default=argparse.SUPPRESS)
        else:
            base = next((a for a in args if a is not type(None)), kind)  # Optional[int] -> int
            parser.add_argument(*flags, type=_parse_optional(base), metavar=base.__name__.upper(), help=text,
                                default=argparse.SUPPRESS)
    given = vars(parser.parse_args(sys.argv[1:] if argv is None else argv))
    cfg = config_cls(**given)
    sources(cfg).update(dict.fromkeys(given, "typed"))
    if isinstance(getattr(cfg, "device", None), str):
        distributed.pick_device(cfg.device)  # a GPU that is not there: one line now, before anything is built
    return cfg, set(given)


class _Parser(argparse.ArgumentParser):
    """argparse, whose errors are one line (`script.py: error: ...`, exit code 2) like every other user error,
    without the usage text before it (--help shows that)."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (--help lists the flags)\n")


PRECISIONS = ("float32", "bfloat16", "float16")  # --dtype: what the weights can be stored in
LARGEST = 10 ** 15  # no count of tokens, steps or anything else a flag sets comes near this: a larger one is a typo


def check_flags(cfg, *, positive=(), non_negative=(), fractions=(), below_one=(), choices=None):
    """One ValueError line naming the first flag of `cfg` whose value is out of range, before any work: positive
    (> 0; a whole number at least 1), non_negative (>= 0), fractions (0..1), below_one (0 <= x < 1), choices
    ({field: allowed values}). None passes: it means "not set" wherever a field allows it. Every config calls it
    from __post_init__, so the scripts' values are checked as they are parsed."""
    def bad(name, rule):
        value = getattr(cfg, name)
        raise ValueError(f"--{name.replace('_', '-')} {_flag_text(value)}: {rule}")
    for f in dataclasses.fields(cfg):  # every number: finite (--lr inf, --alpha nan) and of a size a run can have
        v = getattr(cfg, f.name)
        if isinstance(v, float) and not math.isfinite(v):
            bad(f.name, "must be a finite number")
        if isinstance(v, int) and not isinstance(v, bool) and abs(v) > LARGEST:
            bad(f.name, f"is beyond what any run can use (at most {LARGEST:.0e})")
    for name in positive:
        v = getattr(cfg, name)
        if v is not None and not v > 0:  # NaN fails too
            bad(name, "must be at least 1" if isinstance(v, int) else "must be greater than 0")
    for name in non_negative:
        v = getattr(cfg, name)
        if v is not None and not v >= 0:
            bad(name, "must be 0 or more")
    for name in fractions:
        v = getattr(cfg, name)
        if v is not None and not 0 <= v <= 1:
            bad(name, "must be a fraction between 0 and 1")
    for name in below_one:
        v = getattr(cfg, name)
        if v is not None and not 0 <= v < 1:
            bad(name, "must be at least 0 and below 1")
    for name, allowed in (choices or {}).items():
        v = getattr(cfg, name)
        if v is not None and v not in allowed:
            bad(name, f"expected {', '.join(allowed[:-1])} or {allowed[-1]}" if len(allowed) > 1 else
                f"expected {allowed[0]}")


def check_one_step(max_tokens: int, step_tokens: int, step: str):
    """--max-tokens must buy at least one optimizer step of `step_tokens` (`step`: how they are made up)."""
    if max_tokens < step_tokens:
        raise ValueError(f"--max-tokens {max_tokens:,} is less than one optimizer step ({step} = {step_tokens:,} "
                         f"tokens): give --max-tokens {step_tokens} or more")


def set_untyped(cfg, typed: set[str], preset: dict, source: str = "preset"):
    """Set every field of `preset` that the user did not type on the command line; sources(cfg) names `source` as
    where each of them came from."""
    for key, value in preset.items():
        if key not in typed:
            setattr(cfg, key, value)
            sources(cfg)[key] = source
    return cfg


def sources(cfg) -> dict[str, str]:
    """Where each value of a config came from: "typed" on the command line, a preset ("preset": the tiny model's preset
    (config/); "recipe": --recipe authors), or the dataclass "default". Kept on the config object beside its fields
    (asdict leaves it out); results files record it as config_sources."""
    return vars(cfg).setdefault("_sources", {f.name: "default" for f in dataclasses.fields(cfg)})


def log_preset(cfg, source: str, header: str):
    """The header, then one log line per value that `source` set and that differs from the dataclass default (what
    --help shows)."""
    lines = []
    for f in dataclasses.fields(cfg):
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        value = getattr(cfg, f.name)
        if sources(cfg)[f.name] == source and value != default:
            lines.append(f"  --{f.name.replace('_', '-')} {_flag_text(value)} (default {_flag_text(default)})")
    if lines:
        log("\n".join([header, *lines]))


def _flag_text(value) -> str:
    return " ".join(map(str, value)) if isinstance(value, list) else str(value)


def _parse_bool(s: str) -> bool:
    if s.lower() in ("1", "true", "yes", "on"):
        return True
    if s.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true/false, got {s!r}")


def _parse_optional(base):
    def parse(s: str):
        return None if s.lower() == "none" else base(s)
    parse.__name__ = base.__name__
    return parse


# Bad input (a missing file, a flag out of range, a corrupt checkpoint) raises one of these with a message that says
# what is wrong and what to do; anything else is a bug and keeps its traceback.
USER_ERRORS = (ValueError, FileNotFoundError, NotADirectoryError, IsADirectoryError, PermissionError,
               FloatingPointError, ModuleNotFoundError,  # an optional package is not installed
               ConnectionError,  # a server that holds the data cannot be reached (the message says what to do)
               disk.DiskFull)  # no space left where a file was being written (the message names the folder)


def full_disk(e: BaseException) -> str | None:
    """The line for an OSError of a full disk raised outside disk.atomic_path (a plain write), naming the folder;
    None for any other error."""
    import errno
    if isinstance(e, disk.DiskFull) or getattr(e, "errno", None) not in (errno.ENOSPC, errno.EDQUOT):
        return None
    where = os.path.dirname(os.path.abspath(e.filename)) if getattr(e, "filename", None) else "the output folder"
    return f"no space left on the disk of {where}: free space there, or choose another folder"


def cli(main):
    """Run a script's main as a command: a user error ends as `script.py: error: <one line>` on stderr with exit
    code 2, like argparse's own errors; `--debug` or LORASAE_DEBUG=1 shows the traceback instead."""
    prog = os.path.basename(sys.argv[0])
    debug = "--debug" in sys.argv or bool(os.environ.get("LORASAE_DEBUG"))
    sys.argv = [a for a in sys.argv if a != "--debug"]
    try:
        main()
    except (*USER_ERRORS, OSError) as e:
        if debug or not (isinstance(e, USER_ERRORS) or full_disk(e)):
            raise
        msg = full_disk(e) or " ".join(str(e).split()) or type(e).__name__
        print(f"{prog}: error: {msg} (--debug shows the traceback)", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print(f"{prog}: interrupted; the last checkpoint continues with --resume", file=sys.stderr)
        sys.exit(130)


def log(*args, **kwargs):
    """print on rank 0 only (every rank computes the same numbers), flushed so that progress shows under pipes."""
    if not dist.is_initialized() or dist.get_rank() == 0:
        print(*args, **kwargs, flush=True)


def native_bf16(device: torch.device) -> bool:
    """Whether bf16 matmuls run in hardware: a CUDA GPU that supports them, a CPU with AVX512-BF16 or AMX. Elsewhere
    PyTorch emulates them, far slower than fp32 (experiments/README.md has the numbers)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    try:
        with open("/proc/cpuinfo") as f:
            flags = f.read()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def resolve_autocast(device: torch.device, dtype: str) -> str:
    """--autocast auto: bfloat16 where the hardware runs it natively, else float32 (autocast off)."""
    if dtype == "auto":
        return "bfloat16" if native_bf16(device) else "float32"
    if dtype not in ("bfloat16", "float16", "float32"):
        raise ValueError(f"--autocast {dtype!r}: expected auto, bfloat16, float16 or float32")
    return dtype


def autocast(device: torch.device, dtype: str = "auto"):
    """The activation precision of every script: bf16 autocast (on CPUs with native bf16 too, where it beats fp32), or
    none."""
    dtype = resolve_autocast(device, dtype)
    if dtype == "float32":
        return torch.autocast(device.type, enabled=False)
    return torch.autocast(device.type, dtype=getattr(torch, dtype))


def peak_flops(device: torch.device, dtype: str = "bfloat16") -> float:
    """Dense peak FLOP/s used for MFU: LORASAE_PEAK_FLOPS if set; known GPUs by their datasheet; on CPU the measured
    rate of a 1024 x 1024 matmul in `dtype` (a datasheet number means little for a CPU: AVX2, AVX-512 and AMX differ
    by 10x, and bf16 without hardware support is emulated)."""
    if "LORASAE_PEAK_FLOPS" in os.environ:
        return float(os.environ["LORASAE_PEAK_FLOPS"])
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, tf in (("H200", 989e12), ("H100", 989e12), ("A100", 312e12), ("L40", 181e12), ("4090", 165e12)):
            if key in name:
                return tf if dtype != "float32" else tf / 16
        return 100e12
    return _cpu_matmul_flops(dtype)


@functools.lru_cache(maxsize=None)
def _cpu_matmul_flops(dtype: str, n: int = 1024, reps: int = 2, trials: int = 5) -> float:
    # its own generator, not the training stream: a resumed run measures again, and must draw the same masks
    a = torch.randn(n, n, dtype=getattr(torch, dtype), generator=torch.Generator().manual_seed(0))
    a @ a  # warm-up: thread pool, packing buffers
    best = 0.0
    for _ in range(trials):  # the fastest trial: a core shared with other jobs makes any one trial slow
        t0 = time.perf_counter()
        for _ in range(reps):
            a @ a
        best = max(best, 2 * n ** 3 * reps / (time.perf_counter() - t0))
    return best


class Progress:
    """A line with rate and ETA at most every `every` seconds, and one at the end (rank 0 only)."""

    def __init__(self, total: int, what: str, every: float = 10.0):
        self.total, self.what, self.every, self.done = total, what, every, 0
        self.t0 = self.last = time.time()

    def step(self, n: int = 1):
        self.done += n
        now = time.time()
        if now - self.last >= self.every or self.done == self.total:
            self.last, el = now, now - self.t0
            eta = el / self.done * (self.total - self.done)
            log(f"{self.what}: {self.done}/{self.total} ({el:.0f}s, ETA {eta:.0f}s)")


# ----------------------------------------------------------------------------------------------------------------------
# The learning-rate schedule of every training script


def lr_at(step: int, total: int, peak: float, warmup_frac: float = 0.0, decay_frac: float = 0.0,
          min_lr_frac: float = 0.0, shape: str = "linear") -> float:
    """Linear warmup over the first warmup_frac of the steps, constant, then over the last decay_frac a linear or
    cosine decay to peak * min_lr_frac. warmup_frac = decay_frac = 0 is a constant rate (the paper's LoRA runs)."""
    warmup = max(1, int(warmup_frac * total)) if warmup_frac > 0 else 0
    if step < warmup:
        return peak * (step + 1) / warmup
    decay_start = max(warmup, int((1 - decay_frac) * total)) if decay_frac > 0 else total
    if step < decay_start:
        return peak
    progress = min(1.0, (step - decay_start) / max(1, total - decay_start))
    if shape == "cosine":
        return peak * (min_lr_frac + (1 - min_lr_frac) * 0.5 * (1 + math.cos(math.pi * progress)))
    if shape == "linear":
        return peak * (min_lr_frac + (1 - min_lr_frac) * max(0.0, 1 - progress))
    raise ValueError(f"unknown learning-rate schedule {shape!r} (expected linear or cosine)")


# ----------------------------------------------------------------------------------------------------------------------
# Random state of a training step (LoRA dropout). On CPU dropout draws from torch's default generator, under
# torch.compile too (the compiled kernels take fresh seeds from it on every call); on a GPU from the device's generator.
# Each rank has its own stream, so a checkpoint keeps every rank's state, gathered like the loaders' positions.


def seed_per_rank(seed: int, rank: int):
    """Seed the random draws of training on this rank (after the weights are initialised, identically on every rank):
    each rank its own stream, as each sequence of one process's batch gets its own dropout mask, and none of them
    the stream that `seed` initialised the weights from. Hashed to 32 bits: the CPU generator (a Mersenne twister)
    keeps only the low 32 bits of a seed."""
    import numpy as np
    torch.manual_seed(int(np.random.SeedSequence((seed, rank)).generate_state(1)[0]))


def rng_state() -> dict:
    """This process's random state: torch's CPU generator and, once CUDA is in use, the current device's."""
    state = dict(cpu=torch.get_rng_state())
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(saved, rank: int = 0):
    """Restore this rank's rng_state() from a checkpoint's list of every rank's (loaded onto any device: torch takes
    the states back as CPU tensors). A bare CPU state, what a checkpoint that kept rank 0's alone holds, serves
    every rank; a checkpoint without any (None) leaves the state as it is."""
    if saved is None:
        return
    state = dict(cpu=saved) if torch.is_tensor(saved) else saved[rank]
    torch.set_rng_state(state["cpu"].cpu())
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"].cpu())
