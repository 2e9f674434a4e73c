"""The little that every training script shares: CLI from a dataclass, torchrun/DDP setup, device, atomic saves."""
from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import typing

import torch
import torch.distributed as dist


def parse_args(config_cls, argv=None, description: str | None = None):
    """Every dataclass field becomes a `--flag` with its default; `--layer 12 --rank 64` overrides, nothing else."""
    parser = argparse.ArgumentParser(description=description or (config_cls.__doc__ or "").strip(),
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    hints = typing.get_type_hints(config_cls)
    for f in dataclasses.fields(config_cls):
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        flags = ["--" + f.name.replace("_", "-")] + (["--" + f.name] if "_" in f.name else [])  # both spellings
        kind = hints[f.name]
        origin_args = typing.get_args(kind)
        if kind is bool:
            parser.add_argument(*flags, type=_parse_bool, default=default, nargs="?", const=True, metavar="BOOL")
        elif typing.get_origin(kind) is list:
            parser.add_argument(*flags, action="append", type=origin_args[0], default=None, metavar="VALUE",
                                help="repeat for several")
        else:
            base = next((a for a in origin_args if a is not type(None)), kind)  # Optional[int] -> int
            parser.add_argument(*flags, type=_parse_optional(base), default=default, metavar=base.__name__.upper())
    ns = vars(parser.parse_args(sys.argv[1:] if argv is None else argv))
    for f in dataclasses.fields(config_cls):  # list flags: the default unless given at least once
        if ns[f.name] is None and typing.get_origin(hints[f.name]) is list:
            ns[f.name] = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
    return config_cls(**ns)


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


@dataclasses.dataclass
class Dist:
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    device: torch.device = dataclasses.field(default_factory=lambda: torch.device("cpu"))

    @property
    def master(self) -> bool:
        return self.rank == 0


def setup(device: str | None = None) -> Dist:
    """Read torchrun's env vars (RANK, LOCAL_RANK, WORLD_SIZE); gloo on CPU, nccl on CUDA. Single process otherwise."""
    if device in (None, "", "auto"):
        device = "cuda" if torch.cuda.is_available() else "cpu"
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return Dist(device=torch.device(device))
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if device.startswith("cuda"):
        torch.cuda.set_device(local)
        dev = torch.device("cuda", local)
    else:
        dev = torch.device("cpu")
    if not dist.is_initialized():
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo")
    return Dist(rank=rank, local_rank=local, world_size=world, device=dev)


def teardown():
    if dist.is_initialized():
        dist.barrier()  # no rank tears the group down while another is still inside a collective
        dist.destroy_process_group()


def autocast(device: torch.device, dtype: str = "bfloat16"):
    """bf16 autocast on CPU too: this CPU family runs bf16 matmuls several times faster than fp32."""
    if dtype == "float32":
        return torch.autocast(device.type, enabled=False)
    return torch.autocast(device.type, dtype=getattr(torch, dtype))


def atomic_torch_save(obj, path: str):
    """A crash mid-write never leaves a truncated checkpoint: write a temp file, then rename over the old one."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    torch.save(obj, tmp)
    os.replace(tmp, path)


def all_reduce_mean(t: torch.Tensor) -> torch.Tensor:
    if dist.is_initialized():
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        t /= dist.get_world_size()
    return t


def all_gather_cat(t: torch.Tensor) -> torch.Tensor:
    """Every rank's tensor, concatenated along dim 0 (the tensor itself in a single process)."""
    if not dist.is_initialized():
        return t
    parts = [torch.empty_like(t) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, t.contiguous())
    return torch.cat(parts)


def gather_objects(obj) -> list:
    """Every rank's picklable object (e.g. its data-loader position), in rank order, on every rank."""
    if not dist.is_initialized():
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def all_reduce_grads(params):
    """Average gradients over ranks with one flat all-reduce: what DDP does, for the few parameters that train here."""
    if not dist.is_initialized():
        return
    params = [p for p in params if p.grad is not None]
    flat = all_reduce_mean(torch.cat([p.grad.reshape(-1) for p in params]))
    torch.nn.utils.vector_to_parameters(flat, [p.grad for p in params])


def whole(t: torch.Tensor) -> torch.Tensor:
    """A tensor in one piece: an FSDP2-sharded DTensor is gathered (a collective: every rank must call it)."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t.detach()


def shard_like(p: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """The inverse of whole(): this rank's shard of the whole tensor t when p is an FSDP2-sharded DTensor, else t."""
    if not hasattr(p, "full_tensor"):
        return t
    from torch.distributed.tensor import distribute_tensor
    return distribute_tensor(t.to(p.device), p.device_mesh, p.placements)


def peak_flops(device: torch.device, dtype: str = "bfloat16") -> float:
    """Dense peak FLOP/s used for MFU: known GPUs by name; on CPU an override via LORASAE_PEAK_FLOPS (default 1 TF)."""
    if "LORASAE_PEAK_FLOPS" in os.environ:
        return float(os.environ["LORASAE_PEAK_FLOPS"])
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, tf in (("H200", 989e12), ("H100", 989e12), ("A100", 312e12), ("L40", 181e12), ("4090", 165e12)):
            if key in name:
                return tf if dtype != "float32" else tf / 16
        return 100e12
    return 1e12
