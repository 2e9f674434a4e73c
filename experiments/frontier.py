"""
`python experiments/run.py frontier`: Fig. 1/5 and Tables 1-2, TopK vs e2e vs TopK + LoRA, CE against training time
and FLOPs (the steps and the results files: experiments/harness.py).
"""
from __future__ import annotations

import csv
import json
import math
import os
import sys
import time
from dataclasses import asdict

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


from plumbing import common  # noqa: E402
from formats import disk  # noqa: E402
from accounting.flops import adapt_step_flops, e2e_step_flops, sae_buffer_windows, sae_run_flops  # noqa: E402
from config.train_e2e import E2EConfig  # noqa: E402
from config.train_sae import TrainSAEConfig  # noqa: E402
from sae import SAE  # noqa: E402
from experiments.harness import (  # noqa: E402  (the steps, the results files)
    ExpConfig, _CACHED, _RAN, _STEPS, adapt_run, embedded_paths, held_out, pyplot, run, save, savefig,
    tiny, train_topk)


# ----------------------------------------------------------------------------------------------------------------------
# 1. Loss vs compute (Fig. 1, 5; Tables 1, 2)


def auxk_steps(history: list[dict], steps: int) -> int:
    """How many of the first `steps` steps ran AuxK (some latent dead), as read from the training log: a log line
    records whether the step before it did (`auxk` in its stats), and stands for every step since the previous line.
    An estimate, exact to a log interval where AuxK switches on or off."""
    done, n = 0, 0
    for r in history:
        if "fvu" in r and r["step"] > done:  # a training log line (held-out rows carry ce_* instead)
            upto = min(r["step"], steps)
            n += max(0, upto - done) if "auxk" in r else 0
            done = r["step"]
    return n


def e2e_checkpoint(folder: str) -> str:
    """The checkpoint of a train_e2e.py run: ckpt.pt (state.pt in runs from before the scripts shared one name)."""
    new = os.path.join(folder, "ckpt.pt")
    return new if os.path.isfile(new) else os.path.join(folder, "state.pt")


def interpolate(xs, ys, x):
    for (x0, y0), (x1, y1) in zip(zip(xs, ys), zip(xs[1:], ys[1:])):
        if x0 <= x <= x1:
            return y0 + (y1 - y0) * (x - x0) / max(x1 - x0, 1e-12)
    return ys[-1] if x > xs[-1] else ys[0]


def reaching(points: list[dict], key: str, ce: float) -> dict | None:
    """The first point, in order of `key` (time, flops), whose CE is `ce` or lower (None: never, within its budget)."""
    return next((q for q in sorted(points, key=lambda q: q[key]) if q["ce"] <= ce + 1e-9), None)


def speedups(points: dict, thresholds: list[float], key: str, fmt, backward: bool = False):
    """Tables 1-2 at `key` (time, flops): what each method spends to first reach each CE, e2e's over TopK + LoRA's
    (None where either never does) and, with `backward`, the backward passes through the model it took there.
    Returns (rows, markdown lines)."""
    table = [f"| CE loss reached | TopK + LoRA | TopK | e2e | speedup at matched {key} (e2e / TopK + LoRA) |"
             + (" backward passes: TopK + LoRA | e2e | e2e / TopK + LoRA |" if backward else ""),
             "|---" * (8 if backward else 5) + "|"]
    rows = []
    for ce in thresholds:
        hit = {k: reaching(v, key.lower(), ce) for k, v in points.items()}
        r = dict(ce=ce, **{k: q[key.lower()] if q else None for k, q in hit.items()},
                 **{k + "_backward": q["backward"] if q else None for k, q in hit.items()})
        r["speedup"] = r["e2e"] / r["topk_lora"] if r["e2e"] and r["topk_lora"] else None
        sp = f"{r['speedup']:.2f}x" if r["speedup"] else (
            f"> {max(q[key.lower()] for q in points['e2e']) / r['topk_lora']:.2f}x" if r["topk_lora"] else "-")
        b, e = r["topk_lora_backward"], r["e2e_backward"]
        table.append(f"| {ce:.3f} | {fmt(r['topk_lora'])} | {fmt(r['topk'])} | {fmt(r['e2e'])} | {sp} |" + (
            f" {b if b else '-'} | {e if e else 'not reached'} | {f'{e / b:.1f}x' if b and e else '-'} |"
            if backward else ""))
        rows.append(r)
    return rows, table


def frontier(cfg: ExpConfig):
    _, _, layer, mcfg = embedded_paths(cfg)
    root = os.path.join(cfg.out, "frontier")
    topk = train_topk(cfg, os.path.join(root, "topk"), layer, cfg.sae_tokens)
    e2e = os.path.join(root, "e2e")
    e2e_args = ["--recipe", cfg.recipe, "--layer", str(layer), "--k", str(cfg.k), "--expansion", str(cfg.expansion),
                "--max-tokens", str(cfg.e2e_tokens)]
    if tiny(cfg):
        e2e_args += ["--batch-size", "8", "--seq-len", "256", "--dead-tokens", "1000000", "--eval-interval", "100000"]
    run(cfg, "train_e2e.py", e2e, e2e_args, "cfg.json")

    # training time of each checkpoint: the SAE runs log their elapsed seconds (training steps only, no evaluation)
    with open(os.path.join(topk, "history.json")) as f:
        h = json.load(f)
    log = [r for r in h["history"] if "fvu" in r or "l0" in r]
    total_steps = h["config"]["max_tokens"] // h["config"]["batch_tokens"]
    topk_step = lambda p: round(total_steps * p / 100)
    topk_time = lambda p: interpolate([0] + [r["step"] for r in log], [0.0] + [r["time"] for r in log], topk_step(p))
    with open(os.path.join(e2e, "log.csv")) as f:
        rows = [r for r in csv.DictReader(f) if r.get("seconds")]
    steps, secs = [0] + [int(r["step"]) for r in rows], [0.0] + [float(r["seconds"]) for r in rows]
    e2e_total = max(steps)
    e2e_time = lambda p: interpolate(steps, secs, round(e2e_total * p / 100))

    # training FLOPs of each checkpoint from each run's saved config and step counts (each script's formula), and
    # backward passes through the model as Sec. 4.2 counts them, one per training sequence (its "130x fewer" on
    # Gemma-2-2B and "40x" on Llama-3.2-1B are e2e's 2B / 4B tokens over one adaptation's 15M / 100M): optimizer
    # steps x sequences per step. The TopK SAE's steps backpropagate through the SAE only.
    sae_cfg = common.set_untyped(TrainSAEConfig(), set(), h["config"], "saved")
    sae_shape = dict(layer=sae_cfg.layer[0], d_sae=sae_cfg.expansion * mcfg.d_model, arch=sae_cfg.arch,
                     k=None if sae_cfg.arch == "jumprelu" else sae_cfg.k)
    sae_buffer = dict(batch_tokens=sae_cfg.batch_tokens, buffer_tokens=sae_cfg.buffer_tokens,
                      model_batch=sae_cfg.model_batch, seq_len=sae_cfg.seq_len, include_bos=sae_cfg.include_bos)
    topk_flops = lambda p: sae_run_flops(mcfg, **sae_shape, steps=topk_step(p),
                                         auxk_steps=auxk_steps(h["history"], topk_step(p)), **sae_buffer)
    e2e_cfg = common.set_untyped(E2EConfig(), set(), disk.torch_load(e2e_checkpoint(e2e), "cpu",
                                                                          "e2e state")["config"], "saved")
    e2e_step = e2e_step_flops(mcfg, e2e_cfg.layer[0], e2e_cfg.expansion * mcfg.d_model, e2e_cfg.k,
                              e2e_cfg.batch_size, e2e_cfg.seq_len, e2e_cfg.kl_chunk)
    e2e_tokens = lambda p: round(e2e_total * p / 100) * int(rows[-1]["tokens"]) // int(rows[-1]["step"])

    # held-out CE of every checkpoint, cached next to them (20 evaluations: worth keeping)
    cache_path = os.path.join(root, "heldout.json")
    cache = json.load(open(cache_path)) if os.path.isfile(cache_path) and not cfg.fresh else {}
    for sae_dir in [os.path.join(d, f"ckpt_{p:03d}") for d in (topk, e2e) for p in range(10, 101, 10)]:
        if sae_dir not in cache:
            t0 = time.time()
            cache[sae_dir] = dict(held_out(cfg, [sae_dir], [layer]), seconds=time.time() - t0)
            _RAN.add(sae_dir)
            with open(cache_path, "w") as f:
                json.dump(cache, f, indent=1)
        _STEPS.append(sae_dir)  # its seconds (a held-out evaluation) count in the wall time too
        _CACHED[sae_dir] = cache[sae_dir].get("seconds")
    points = dict(topk=[], e2e=[], topk_lora=[])
    for p in range(10, 101, 10):
        ev = cache[os.path.join(topk, f"ckpt_{p:03d}")]
        points["topk"].append(dict(pct=p, time=topk_time(p), flops=topk_flops(p), backward=0, ce=ev["ce_sae"],
                                   ce_base=ev["ce_base"]))
        points["e2e"].append(dict(pct=p, time=e2e_time(p), flops=e2e_tokens(p) * e2e_step,
                                  backward=e2e_tokens(p) // e2e_cfg.seq_len,
                                  ce=cache[os.path.join(e2e, f"ckpt_{p:03d}")]["ce_sae"]))
    for p in map(int, cfg.frontier_ckpts.split(",")):
        ckpt = os.path.join(topk, f"ckpt_{p:03d}")
        res = adapt_run(cfg, os.path.join(root, f"lora-{p:03d}"), ["--sae", ckpt, "--layer", str(layer),
                                                                    "--max-tokens", str(cfg.lora_tokens)])
        a = res["config"]
        flops = res["train_tokens"] * adapt_step_flops(mcfg, [(layer, SAE.from_pretrained(ckpt))], res["lora_layers"],
                                                       a["rank"], a["seq_len"], a["micro_batch"] or a["batch_size"],
                                                       a["kl_chunk"])
        points["topk_lora"].append(dict(pct=p, time=topk_time(p) + res["train_seconds"], ce=res["ce_sae_lora"],
                                        sae_time=topk_time(p), lora_time=res["train_seconds"],
                                        flops=topk_flops(p) + flops, sae_flops=topk_flops(p), lora_flops=flops,
                                        backward=res["train_tokens"] // a["seq_len"], ce_before=res["ce_sae"]))
    ce_base = points["topk"][0]["ce_base"]

    # Tables 1-2: time, then FLOPs, for each method to first reach a CE; thresholds at what each TopK + LoRA point
    # and the final e2e SAE reached (rounded up to 3 decimals, so the point itself counts as reaching it)
    ceil3 = lambda c: math.ceil(c * 1000 - 1e-6) / 1000
    thresholds = sorted({ceil3(q["ce"]) for q in points["topk_lora"]} | {ceil3(points["e2e"][-1]["ce"])})[::-1]
    fmt = lambda s: f"{s:.0f} s" if s is not None else "not reached"
    fl = lambda x: f"{x:.2e}".replace("e+0", "e").replace("e+", "e") if x is not None else "not reached"
    (rows_t, time_table), (rows_f, flops_table) = (speedups(points, thresholds, "time", fmt),
                                                   speedups(points, thresholds, "FLOPs", fl, backward=True))
    last = {k: v[-1] for k, v in points.items()}
    seq = points["topk_lora"][-1]["backward"]
    table = [f"SAE trainers: the {cfg.recipe} recipe (--recipe {cfg.recipe}).", "", *time_table, "",
             f"Original model CE {ce_base:.4f}. Final CE: TopK {last['topk']['ce']:.4f} "
             f"({last['topk']['time']:.0f} s), e2e {last['e2e']['ce']:.4f} ({last['e2e']['time']:.0f} s), "
             f"TopK + LoRA {last['topk_lora']['ce']:.4f} ({last['topk_lora']['time']:.0f} s).", "",
             "Training FLOPs to reach each CE (accounting/flops.py: sae_run_flops, e2e_step_flops, adapt_step_flops) "
             "and backward passes through the model to reach it (sequences, as Sec. 4.2 counts; TopK + LoRA: its LoRA's):",
             "",
             *flops_table, "",
             f"Backward passes through the model: e2e {last['e2e']['backward']:,} sequences of {e2e_cfg.seq_len} "
             f"tokens for its whole run, each TopK + LoRA adaptation {seq:,} of {a['seq_len']}: "
             f"{last['e2e']['backward'] / max(seq, 1):.1f}x as many (paper: 130x on Gemma-2-2B, 40x on "
             f"Llama-3.2-1B); the TopK SAE none (its {total_steps:,} steps forward "
             f"{sae_buffer_windows(total_steps, **sae_buffer):,} windows through blocks 0..{layer} only). Final "
             f"FLOPs: TopK {fl(last['topk']['flops'])}, e2e {fl(last['e2e']['flops'])}, TopK + LoRA "
             f"{fl(last['topk_lora']['flops'])}.", "",
             "| TopK checkpoint | SAE time | LoRA time | SAE FLOPs | LoRA FLOPs | CE with SAE | CE with SAE + LoRA |",
             "|---|---|---|---|---|---|---|"]
    for q in points["topk_lora"]:
        table.append(f"| {q['pct']}% | {q['sae_time']:.0f} s | {q['lora_time']:.0f} s | {fl(q['sae_flops'])} | "
                     f"{fl(q['lora_flops'])} | {q['ce_before']:.4f} | {q['ce']:.4f} |")
    save("frontier", dict(points=points, ce_base=ce_base, speedups=rows_t, speedups_flops=rows_f, recipe=cfg.recipe,
                          config=asdict(cfg)), "\n".join(table))

    plt = pyplot()
    if plt:
        fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
        for ax, x, xlabel in zip(axes, ("time", "flops"), ("training time (s, 2 CPU cores)", "training FLOPs")):
            for key, label, style in (("topk", "TopK SAE", "o-"), ("e2e", "e2e SAE", "s-"),
                                      ("topk_lora", "TopK + LoRA", "^-")):
                ax.plot([q[x] for q in points[key]], [q["ce"] for q in points[key]], style, label=label)
            ax.axhline(ce_base, color="gray", ls="--", label=f"original model ({ce_base:.3f})")
            ax.set(xlabel=xlabel, title=f"CE loss vs training {'time' if x == 'time' else 'FLOPs'} (cf. Fig. 1)")
        axes[0].set(ylabel="held-out CE with SAE (nats)")
        axes[0].legend()
        savefig(plt, fig, "frontier", cfg)
