"""
Benchmark: a frozen TopK SAE spliced into the residual stream, forward + backward to its input (what LoRA training
through the SAE costs), fused sparse path (`sae(x)`: top-k values/indices + embedding_bag, sparse input gradient)
against the dense path (`sae.decode(sae.encode(x))`: scatter into a (tokens x d_sae) code matrix + matmul).

    python bench_sae.py                                  # Gemma-2-2B size: d 2304, k 64, widths 16k and 65k
    python bench_sae.py --tokens 4096 --iters 3 --autocast true

Each (width, path) runs in a fresh subprocess so that one configuration's allocations cannot hide another's. Reported:
  tokens/s     tokens / wall time of one forward + backward (mean over --iters timed steps after one untimed step)
  peak MB      extra memory at the step's peak over the memory held just before it (SAE weights and the input
               excluded). CPU: the process's peak resident set (VmHWM, reset through /proc/self/clear_refs) minus
               the resident set before the step; CUDA: torch.cuda.max_memory_allocated minus memory_allocated.
  saved MB     bytes of the distinct tensors autograd keeps for the backward (saved_tensors_hooks), not counting
               the SAE's parameters: the activation memory a spliced SAE adds per training step.
"""
from __future__ import annotations

import dataclasses
import json
import os
import re
import subprocess
import sys
import time

import torch

from common import parse_args


@dataclasses.dataclass
class BenchConfig:
    """Fused vs dense TopK SAE: frozen forward + backward to the input."""
    tokens: int = 2048
    d_in: int = 2304
    k: int = 64
    widths: list[int] = dataclasses.field(default_factory=lambda: [16384, 65536])
    iters: int = 1
    device: str = "auto"
    autocast: bool = False  # bf16 autocast around the forward
    threads: int = 0  # torch.set_num_threads; 0 keeps the default
    child: str = ""  # internal: "width,path" runs one configuration and prints one JSON line


def rss_kb(field: str) -> int:
    return int(re.search(rf"{field}:\s+(\d+) kB", open("/proc/self/status").read()).group(1))


def run_one(cfg: BenchConfig, width: int, path: str) -> dict:
    from sae import SAE
    device = torch.device(cfg.device)
    torch.manual_seed(0)
    sae = SAE(cfg.d_in, width, "topk", k=cfg.k, device=device).eval().requires_grad_(False)
    with torch.no_grad():
        sae.b_enc.normal_(0, 0.1)
        sae.b_dec.normal_(0, 0.1)
    x = torch.randn(cfg.tokens, cfg.d_in, device=device, requires_grad=True)
    grad_out = torch.randn(cfg.tokens, cfg.d_in, device=device)
    params = {p.untyped_storage().data_ptr() for p in sae.parameters()}
    saved = {}

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in params:
            saved[ptr] = t.untyped_storage().nbytes()
        return t

    def step(measure_saved=False):
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.autocast):
            if measure_saved:
                with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
                    y = sae(x) if path == "fused" else sae.decode(sae.encode(x))
            else:
                y = sae(x) if path == "fused" else sae.decode(sae.encode(x))
        y.backward(grad_out)
        x.grad = None

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    # step 1: memory (it also warms up)
    sync()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    else:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset the peak resident set (VmHWM) to the current one
        before = rss_kb("VmRSS") * 1024
    step(measure_saved=True)
    sync()
    peak = torch.cuda.max_memory_allocated() if device.type == "cuda" else rss_kb("VmHWM") * 1024
    times = []
    for _ in range(cfg.iters):
        sync()
        t0 = time.perf_counter()
        step()
        sync()
        times.append(time.perf_counter() - t0)
    dt = sum(times) / len(times)
    return dict(width=width, path=path, step_s=dt, tokens_per_s=cfg.tokens / dt, peak_mb=(peak - before) / 2**20,
                saved_mb=sum(saved.values()) / 2**20)


def main():
    cfg = parse_args(BenchConfig)
    if cfg.device == "auto":
        cfg.device = "cuda" if torch.cuda.is_available() else "cpu"
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    if cfg.child:
        width, path = cfg.child.split(",")
        print(json.dumps(run_one(cfg, int(width), path)))
        return
    dev = torch.cuda.get_device_name() if cfg.device.startswith("cuda") else f"CPU ({torch.get_num_threads()} threads)"
    print(f"frozen TopK SAE, forward + backward to the input: tokens {cfg.tokens}, d_in {cfg.d_in}, k {cfg.k}, "
          f"{'bf16 autocast' if cfg.autocast else 'fp32'}, {dev}, torch {torch.__version__}")
    rows = []
    for width in cfg.widths:
        for path in ("fused", "dense"):
            argv = [sys.argv[0], "--tokens", str(cfg.tokens), "--d-in", str(cfg.d_in), "--k", str(cfg.k),
                    "--iters", str(cfg.iters), "--device", cfg.device, "--autocast", str(cfg.autocast),
                    "--threads", str(cfg.threads), "--child", f"{width},{path}"]
            out = subprocess.run([sys.executable] + argv, capture_output=True, text=True,
                                 cwd=os.path.dirname(os.path.abspath(__file__)))
            if out.returncode:
                sys.exit(f"width {width} {path} failed:\n{out.stderr[-3000:]}")
            rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
            r = rows[-1]
            print(f"  ran width {width:>6} {path:<5}: {r['step_s']:.2f} s/step", flush=True)
    print("\n| d_sae  | path  | tokens/s | s/step | peak MB | saved MB |")
    print("|--------|-------|---------:|-------:|--------:|---------:|")
    for r in rows:
        print(f"| {r['width']:<6} | {r['path']:<5} | {r['tokens_per_s']:>8.0f} | {r['step_s']:>6.3f} "
              f"| {r['peak_mb']:>7.0f} | {r['saved_mb']:>8.1f} |")
    print()
    for width in cfg.widths:
        f, d = (next(r for r in rows if r["width"] == width and r["path"] == p) for p in ("fused", "dense"))
        print(f"d_sae {width}: fused is {f['tokens_per_s'] / d['tokens_per_s']:.1f}x faster, peak memory "
              f"{d['peak_mb'] / max(f['peak_mb'], 1e-9):.1f}x smaller, saved tensors "
              f"{d['saved_mb'] / max(f['saved_mb'], 1e-9):.1f}x smaller")


if __name__ == "__main__":
    main()
