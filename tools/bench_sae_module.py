"""
`python tools/bench.py sae-module`: a frozen TopK SAE in the residual stream, forward + backward to its input (what
LoRA training through the SAE costs), fused sparse path against the dense one, each (width, path) in a fresh
subprocess. peak MB: extra memory at the step's peak (CPU: VmHWM reset through /proc/self/clear_refs; CUDA:
max_memory_allocated); saved MB: the distinct tensors autograd keeps for the backward, the SAE's parameters not counted.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field

import torch

from plumbing import common

BENCH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "bench.py")


@dataclass
class SAEModuleConfig:
    """Fused vs dense TopK SAE: frozen forward + backward to the input."""
    tokens: int = 2048  # tokens per step
    d_in: int = 2304  # residual width (Gemma-2-2B's)
    k: int = 64  # active latents per token
    widths: list[int] = field(default_factory=lambda: [16384, 65536])  # SAE widths to measure
    iters: int = 1  # timed steps per configuration
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    autocast: str = "bfloat16"  # activation precision around the forward: auto | bfloat16 | float32
    paths: list[str] = field(default_factory=lambda: ["fused", "dense", "fused-bf16-encoder"])  # fused: sae(x), the
    # encoder in fp32 as always; dense: decode(encode(x)); fused-bf16-encoder: sae(x) with the encoder matmul left to
    # autocast (bf16 operands): what keeping the SAE maths in fp32 costs
    threads: int = 0  # torch.set_num_threads; 0 keeps the default
    child: str = ""  # internal: "width,path" runs one configuration and prints one JSON line


def rss_kb(field: str) -> int:
    return int(re.search(rf"{field}:\s+(\d+) kB", open("/proc/self/status").read()).group(1))


def sae_module_one(cfg: SAEModuleConfig, width: int, path: str) -> dict:
    import contextlib

    import sae as sae_module
    from sae import SAE
    if path == "fused-bf16-encoder":  # for this measurement only: the encoder's matmul follows autocast
        sae_module.fp32_region = lambda x: contextlib.nullcontext()
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
        with common.autocast(device, cfg.autocast):
            with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t) if measure_saved else \
                    contextlib.nullcontext():
                y = sae.decode(sae.encode(x)) if path == "dense" else sae(x)
        y.backward(grad_out)
        x.grad = None

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    sync()  # step 1: memory (it also warms up)
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
    t0 = time.perf_counter()
    for _ in range(cfg.iters):
        step()
    sync()
    dt = (time.perf_counter() - t0) / cfg.iters
    return dict(width=width, path=path, step_s=dt, tokens_per_s=cfg.tokens / dt, peak_mb=(peak - before) / 2**20,
                saved_mb=sum(saved.values()) / 2**20)


def bench_sae_module(argv):
    cfg, _ = common.parse_args(SAEModuleConfig, argv)
    if cfg.device == "auto":
        cfg.device = "cuda" if torch.cuda.is_available() else "cpu"
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    cfg.autocast = common.resolve_autocast(torch.device(cfg.device), cfg.autocast)
    if cfg.child:
        width, path = cfg.child.split(",")
        print(json.dumps(sae_module_one(cfg, int(width), path)))
        return
    dev = torch.cuda.get_device_name() if cfg.device.startswith("cuda") else f"CPU ({torch.get_num_threads()} threads)"
    print(f"frozen TopK SAE, forward + backward to the input: tokens {cfg.tokens}, d_in {cfg.d_in}, k {cfg.k}, "
          f"{cfg.autocast} autocast, {dev}, torch {torch.__version__}")
    rows = []
    for width in cfg.widths:
        for path in cfg.paths:
            argv = [f"--{k}={v}" for k, v in asdict(cfg).items() if k not in ("widths", "paths", "child")]
            out = subprocess.run([sys.executable, BENCH, "sae-module", *argv,
                                  f"--child={width},{path}"], capture_output=True, text=True)
            if out.returncode:
                sys.exit(f"width {width} {path} failed:\n{out.stderr[-3000:]}")
            rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
            print(f"  ran width {width:>6} {path:<5}: {rows[-1]['step_s']:.2f} s/step", flush=True)
    print("\n| d_sae  | path  | tokens/s | s/step | peak MB | saved MB |")
    print("|--------|-------|---------:|-------:|--------:|---------:|")
    for r in rows:
        print(f"| {r['width']:<6} | {r['path']:<5} | {r['tokens_per_s']:>8.0f} | {r['step_s']:>6.3f} "
              f"| {r['peak_mb']:>7.0f} | {r['saved_mb']:>8.1f} |")
    print()
    for width in cfg.widths:
        r = {x["path"]: x for x in rows if x["width"] == width}
        f, d, b = r.get("fused"), r.get("dense"), r.get("fused-bf16-encoder")
        if f and d:
            print(f"d_sae {width}: fused is {f['tokens_per_s'] / d['tokens_per_s']:.1f}x faster, peak memory "
                  f"{d['peak_mb'] / max(f['peak_mb'], 1e-9):.1f}x smaller, saved tensors "
                  f"{d['saved_mb'] / max(f['saved_mb'], 1e-9):.1f}x smaller")
        if f and b:
            print(f"d_sae {width}: a step with the fp32 encoder takes {f['step_s'] / b['step_s']:.2f}x the time of one "
                  f"with a bf16 encoder under {cfg.autocast} autocast ({f['step_s']:.3f} vs {b['step_s']:.3f} s)")
