"""Where one training step's time goes: torch.profiler's self time of every op, summed by phase (the
`record_function` labels of PHASES the bench's step carries) and by op family, printed as a table.

    python tools/bench.py adapt --profile      # the only caller: the bench's step, after its warm-up steps
"""
from __future__ import annotations

import time

import torch


PHASES = ("original forward", "spliced forward", "KL + CE forward", "backward", "optimizer")
FAMILIES = (  # op-name patterns -> family, first match wins
    ("matmul", ("mm", "addmm", "bmm", "matmul", "linear", "mkldnn", "mkl_linear", "embedding_bag", "baddbmm")),
    ("attention", ("flex_attention", "scaled_dot_product", "flash", "efficient_attention", "sdpa")),
    ("vocabulary softmax / KL", ("softmax", "log_softmax", "logsumexp", "kl_div", "nll_loss", "tanh", "exp", "log")),
    ("top-k / gather", ("topk", "gather", "scatter", "index")),
    ("compiled fused kernels", ("compiled", "cpp_fused", "triton", "graph_", "inductor")),
    ("copies / casts", ("copy_", "to", "_to_copy", "clone", "contiguous", "cat", "fill_", "zero_")),
)
OTHER = "other elementwise / bookkeeping"


def family(name: str) -> str:
    n = name.lower().removeprefix("aten::")
    for fam, keys in FAMILIES:
        if any(n == k or n.startswith(k + "_") or (len(k) > 5 and k in n) for k in keys):
            return fam
    return OTHER


def profiled(step, b, dev) -> float:
    """Run `step` b.warmup times, then b.steps times under torch.profiler; print the self time of every op by
    (phase, op family); return seconds per step (wall, under the profiler)."""
    from torch.profiler import ProfilerActivity, profile
    for _ in range(b.warmup):
        step()
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if dev.type == "cuda" else [])
    t0 = time.perf_counter()
    with profile(activities=acts) as prof:
        for _ in range(b.steps):
            step()
        if dev.type == "cuda":
            torch.cuda.synchronize()
    wall = (time.perf_counter() - t0) / b.steps
    table, total, other = {}, 0.0, {}
    for e in prof.events():
        if e.name in PHASES or e.name.startswith("ProfilerStep"):
            continue
        t = e.self_device_time_total if dev.type == "cuda" else e.self_cpu_time_total
        if t <= 0:
            continue
        phase, p = "(outside the phases)", e.cpu_parent
        while p is not None:
            if p.name in PHASES:
                phase = p.name
                break
            p = p.cpu_parent
        key = (phase, family(e.name))
        table[key] = table.get(key, 0.0) + t / 1e6 / b.steps
        total += t / 1e6 / b.steps
        if key[1] in (OTHER, "compiled fused kernels"):
            named = other.setdefault(key[1], {})
            named[e.name] = named.get(e.name, 0.0) + t / 1e6 / b.steps
    fams = [f for f, _ in FAMILIES] + [OTHER]
    phases = [p for p in PHASES + ("(outside the phases)",) if any(k[0] == p for k in table)]
    print(f"\nwhere one step's {'GPU' if dev.type == 'cuda' else 'CPU'} time goes (ms per step, self time of each op; "
          f"{wall * 1e3:.0f} ms wall per step under the profiler)")
    print("| phase | " + " | ".join(fams) + " | total |")
    print("|---" * (len(fams) + 2) + "|")
    for ph in phases + ["all"]:
        cells = [sum(v for (p, f), v in table.items() if f == fam and (ph == "all" or p == ph)) for fam in fams]
        print(f"| {ph} | " + " | ".join(f"{c * 1e3:.0f}" for c in cells) + f" | {sum(cells) * 1e3:.0f} |")
    share = {fam: sum(v for (p, f), v in table.items() if f == fam) / max(total, 1e-12) for fam in fams}
    print("share of the time: " + ", ".join(f"{fam} {x:.0%}" for fam, x in share.items() if x >= 0.005))
    for fam, named in other.items():
        print(f"largest in '{fam}': " + ", ".join(f"{n} {v * 1e3:.0f} ms" for n, v in
                                                   sorted(named.items(), key=lambda kv: -kv[1])[:8]))
    return wall
