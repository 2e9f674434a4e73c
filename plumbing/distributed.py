"""What a run on several processes needs (torchrun): which process and device this is, how a batch splits over the
processes, the collectives (each the identity in a single process) and FSDP2's sharding of the decoder layers. A
student may skip this file: none of it is the method, and a single process only calls pick_device and setup."""
from __future__ import annotations

import dataclasses
import os
import re

import torch
import torch.distributed as dist


# ----------------------------------------------------------------------------------------------------------------------
# torchrun


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
    """Read torchrun's env vars (RANK, LOCAL_RANK, WORLD_SIZE); gloo on CPU, nccl on CUDA. A process torchrun started
    joins its process group even alone (--nproc_per_node 1: NCCL and FSDP2 on one GPU); plain python runs without one.
    A device that is not there ends in one line (pick_device)."""
    dev = pick_device(device)
    if not torchrun():
        return Dist(device=dev)
    rank, local, world = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0")), int(os.environ["WORLD_SIZE"])
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo")
    return Dist(rank=rank, local_rank=local, world_size=world, device=dev)


def batch_split(batch_size: int, micro_batch: int | None, world_size: int) -> tuple[int, int]:
    """(sequences per process per forward, forwards accumulated per optimizer step) for a step of `batch_size`
    sequences over all processes; a batch that does not split is a one-line error."""
    if batch_size < world_size:
        raise ValueError(f"--batch-size {batch_size} (sequences per optimizer step, all processes together) cannot "
                         f"be split over {world_size} processes: give --batch-size {world_size} or a multiple (the "
                         f"paper's run is one sequence per step on one process)")
    micro = micro_batch or batch_size // world_size
    if micro < 1 or batch_size % (micro * world_size):
        raise ValueError(f"--batch-size {batch_size} (sequences per step, all processes together) is not a multiple "
                         f"of --micro-batch {micro} x {world_size} processes: change one of them")
    return micro, batch_size // (micro * world_size)


def torchrun() -> bool:
    """Whether torchrun (or another launcher setting its variables) started this process."""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def pick_device(device: str | None = "auto", gpus: int | None = None) -> torch.device:
    """--device as this process will use it, or a ValueError line saying why it cannot: auto is a GPU where CUDA sees
    one, else the CPU; cuda:N must be a visible GPU; under torchrun each process takes the GPU of its LOCAL_RANK, so a
    node needs a GPU per process. gpus: how many GPUs CUDA sees (default: ask CUDA)."""
    if gpus is None:
        gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    spec = (device or "auto").strip().lower()
    m = re.fullmatch(r"(auto|cpu|cuda)(?::(\d+))?", spec)
    if not m or (m.group(2) is not None and m.group(1) != "cuda"):
        raise ValueError(f"--device {device}: expected auto, cpu, cuda or cuda:N")
    kind, index = m.group(1), m.group(2)
    if kind == "auto":
        kind = "cuda" if gpus else "cpu"
    if kind == "cpu":
        return torch.device("cpu")
    visible = f"{gpus} CUDA GPU{'s are' if gpus != 1 else ' is'} visible here"
    if not gpus:
        why = (f"this torch ({torch.__version__}) is built without CUDA" if torch.version.cuda is None else
               "CUDA sees no GPU here (no driver, or CUDA_VISIBLE_DEVICES hides them)")
        raise ValueError(f"--device {spec}: {why}; use --device cpu (or auto, which picks the CPU here)")
    if torchrun():
        local = int(os.environ.get("LOCAL_RANK", "0"))
        per_node = int(os.environ.get("LOCAL_WORLD_SIZE", local + 1))
        if index is not None:
            raise ValueError(f"--device {spec}: under torchrun each process takes the GPU of its LOCAL_RANK; give "
                             f"--device cuda (or auto), and CUDA_VISIBLE_DEVICES to choose the GPUs")
        if max(per_node, local + 1) > gpus:
            raise ValueError(f"torchrun started {max(per_node, local + 1)} processes on this node but only {visible}: "
                             f"use --nproc_per_node {gpus} (one process per GPU), or --device cpu")
        return torch.device("cuda", local)
    if index is not None and int(index) >= gpus:
        names = "cuda:0" if gpus == 1 else f"cuda:0..cuda:{gpus - 1}"
        raise ValueError(f"--device {spec}: only {visible} ({names}); pick one of those, or cuda")
    return torch.device("cuda" if index is None else f"cuda:{index}")


def teardown():
    if dist.is_initialized():
        dist.barrier()  # no rank tears the group down while another is still inside a collective
        dist.destroy_process_group()


# ----------------------------------------------------------------------------------------------------------------------
# Collectives: every function is the identity in a single process


def all_reduce_mean(t: torch.Tensor) -> torch.Tensor:
    if dist.is_initialized():
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        t /= dist.get_world_size()
    return t


def all_reduce_min(t: torch.Tensor) -> torch.Tensor:
    """The elementwise minimum over ranks, in place (the tensor itself in a single process)."""
    if dist.is_initialized():
        dist.all_reduce(t, op=dist.ReduceOp.MIN)
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


# ----------------------------------------------------------------------------------------------------------------------
# FSDP2: for a model that does not fit one device, every decoder layer's weights (frozen base and adapters) are
# sharded across the ranks and all-gathered just in time for its forward and backward; gradients are reduce-scattered.
# Embeddings and the final norm stay whole on every rank: the tied lm_head reads them outside any module's forward.


def shard_layers(model):
    from torch.distributed.fsdp import fully_shard
    if not dist.is_initialized():
        raise ValueError("--fsdp shards the model across processes: launch with torchrun --nproc_per_node N")
    for layer in model.model.layers:
        fully_shard(layer)
        # every layer is its own FSDP root here (the embeddings stay outside), and FSDP2 keeps a root's weights
        # gathered after its forward; free them after each forward instead, or the model would end up whole
        layer.set_reshard_after_forward(True)


def whole(t: torch.Tensor) -> torch.Tensor:
    """A tensor in one piece: an FSDP2-sharded DTensor is gathered (a collective: every rank must call it)."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t.detach()


def shard_like(p: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """The inverse of whole(): this rank's shard of the whole tensor t when p is an FSDP2-sharded DTensor, else t."""
    if not hasattr(p, "full_tensor"):
        return t
    from torch.distributed.tensor import distribute_tensor
    return distribute_tensor(t.to(p.device), p.device_mesh, p.placements)


def optimizer_state(optimizer, params, load: dict | None = None):
    """Adam's state with whole tensors (under FSDP2 gathered from the shards, the same order on every rank), or that
    state loaded back, each rank keeping its shard: a checkpoint resumes under FSDP, DDP or one process alike."""
    if load is None:
        sd = optimizer.state_dict()
        sd["state"] = {i: {k: whole(v) if torch.is_tensor(v) else v for k, v in sd["state"][i].items()}
                       for i in sorted(sd["state"])}
        return sd
    for i, st in load["state"].items():  # moments have their parameter's shape; Adam's step count is a scalar
        st.update({k: shard_like(params[i], v) for k, v in st.items()
                   if torch.is_tensor(v) and v.shape == params[i].shape})
    optimizer.load_state_dict(load)
