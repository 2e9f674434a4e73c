"""
The paper's findings at small scale, one command per experiment, offline on the embedded tiny pipeline by default.

    python experiments/run.py frontier   # Fig. 1/5, Tables 1-2: TopK vs e2e vs TopK + LoRA, CE against training time
    python experiments/run.py rank       # Fig. 3: LoRA rank 1, 4, 16, 64 on one SAE
    python experiments/run.py layers     # Fig. 9: an adapter on one layer after the SAE vs on all layers after it
    python experiments/run.py multi      # Fig. 6: compound CE with 1, 2, 3 SAEs spliced at once, before and after
    python experiments/run.py jumprelu   # Sec. 3.4: a JumpReLU SAE, adapters on the layers after it only
    python experiments/run.py checks     # Secs. 5.2-5.3 as functional checks: steering, multiple choice, TruthfulQA
    python experiments/run.py default    # python adapt.py, then eval.py --saebench: SAEBench, per-token, distances
    python experiments/run.py all

Every step is a plain call of the project's scripts (train_sae.py, train_e2e.py, adapt.py), printed before it runs so
it can be repeated by hand, writing to out/exp/<experiment>/<run>; a step whose output exists is not redone (delete
the folder, or --fresh, to redo it). Each experiment then writes experiments/results/<name>.json (every number),
<name>.md (the table the README shows) and <name>.png (the figure; needs `pip install matplotlib`).

On a real model the same commands take the paper's settings: e.g.
    python experiments/run.py frontier --model google/gemma-2-2b --data data/pile --layer 12 --k 64 \
        --sae-tokens 2000000000 --e2e-tokens 2000000000 --lora-tokens 15000000
(Sec. 4.2: the TopK and e2e SAEs both train on 2B tokens, the adaptation on 15M.)

Every results/<name>.json records how it was made (`provenance`): the command, the commit, the machine and the wall
time, the latter summed over every step it ran or found done (each step writes run.json next to its output with its
own command and wall seconds; a step done before that file existed counts as unrecorded, and the total is then null).
"""
from __future__ import annotations

import csv
import glob
import json
import math
import os
import platform
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, dataclass

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import torch  # noqa: E402

import adapt  # noqa: E402  (AdaptConfig: the settings adapt.py evaluates with)
import common  # noqa: E402
from formats import disk  # noqa: E402
import embedded  # noqa: E402
import sae as sae_module  # noqa: E402  (run_flops: the frontier's FLOPs axis)
import splice  # noqa: E402  (adapt_step_flops, e2e_step_flops)
import train_e2e  # noqa: E402  (E2EConfig)
import train_sae  # noqa: E402  (TrainSAEConfig)
from formats.checkpoint import resolve_model_dir  # noqa: E402
from model import ModelConfig, Transformer  # noqa: E402
from sae import SAE, load_saes  # noqa: E402

RESULTS = os.path.join(ROOT, "experiments", "results")


@dataclass
class ExpConfig:
    """Settings shared by the experiments; the defaults are the embedded tiny pipeline's (sized for a CPU)."""
    model: str | None = None  # None: the embedded tiny Gemma-2 (4 layers, d_model 192)
    data: str | None = None  # None: the embedded stdlib corpus
    layer: int | None = None  # the SAE layer; None: the middle layer (2 of 0..3 on the tiny model)
    k: int = 16  # TopK SAEs: active latents per token (paper: 64)
    expansion: int = 8  # SAE width = expansion x d_model (paper: 8)
    sae_tokens: int = 4_000_000  # TopK SAE training tokens (paper: 2B on Gemma-2-2B)
    extra_sae_tokens: int = 2_000_000  # the additional TopK SAEs of `multi`
    jumprelu_tokens: int = 3_000_000  # the JumpReLU SAE of `layers` and `jumprelu` (its thresholds need the steps)
    e2e_tokens: int = 1_500_000  # e2e SAE training tokens (the paper stopped its e2e runs after about a week)
    lora_tokens: int = 250_000  # LoRA tokens per TopK checkpoint on the frontier (paper: 15M on Gemma-2-2B)
    adapt_tokens: int = 700_000  # LoRA tokens in rank / layers / multi / jumprelu: the tiny adapt preset's (paper: 15M)
    frontier_ckpts: str = "10,20,30,50,100"  # TopK checkpoints (% of training) adapted on the frontier
    recipe: str = "gao"  # SAE trainers on the frontier: gao (train_sae.py's defaults) | authors (their trainer)
    adapter: str | None = None  # checks: an adapter folder to evaluate (e.g. out/adapt-tiny/adapter, python
    # adapt.py's); none: python adapt.py's run into out/exp/checks/adapt
    seed: int | None = None  # default: adapt.py --seed (a repeat of the default run; its results file says which)
    fresh: bool = False  # redo steps whose output already exists
    out: str = "out/exp"


def tiny(cfg: ExpConfig) -> bool:
    return cfg.model is None


def base_args(cfg: ExpConfig) -> list[str]:
    return [*(["--model", cfg.model] if cfg.model else []), *(["--data", cfg.data] if cfg.data else [])]


_DONE_THIS_RUN: set[str] = set()
_STEPS: list[str] = []  # every step folder the current experiment ran or found done (its wall time is in run.json)
_RAN: set[str] = set()  # those of them it ran itself (their seconds are in its own)
_STARTED = [time.time()]  # when the current experiment started
_CACHED: dict[str, float | None] = {}  # steps recorded in a cache, not a run.json: their seconds
_COMMIT: list[str | None] = [None]  # the commit the invocation started at
STEP_RECORD = "run.json"


def commit() -> str | None:
    """HEAD of the checkout the code ran from, "+dirty" when tracked files differ from it (None outside git)."""
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=True)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                               capture_output=True, text=True, check=True)
    except (OSError, subprocess.CalledProcessError):
        return None
    return head.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")


def machine() -> dict:
    """What a wall time depends on: CPU model and cores, threads, GPU, torch, and the load while it ran."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), cpu)
    except OSError:
        pass
    return dict(cpu=cpu, cores=os.cpu_count(), threads=torch.get_num_threads(),
                cuda=torch.cuda.get_device_name() if torch.cuda.is_available() else None, torch=torch.__version__,
                platform=platform.platform(), load_average=os.getloadavg() if hasattr(os, "getloadavg") else None)


def run(cfg: ExpConfig, script: str, out: str, args: list[str], done_file: str, resume: bool = True):
    """python <script> <args> --out <out> [--resume], unless <out>/<done_file> exists (an interrupted step resumes)."""
    if cfg.fresh and out not in _DONE_THIS_RUN and os.path.isdir(out):
        shutil.rmtree(out)
    _DONE_THIS_RUN.add(out)
    _STEPS.append(out)
    if os.path.isfile(os.path.join(out, done_file)):
        print(f"[done already] {out}")
        return
    cmd = [script, *base_args(cfg), *args, "--out", out, *(["--resume"] if resume else [])]
    print("$ python " + " ".join(cmd), flush=True)
    t0, code = time.time(), commit()  # the commit the step runs at (HEAD may move while it runs)
    _RAN.add(out)
    subprocess.run([sys.executable, *cmd], cwd=ROOT, check=True)
    # a resumed step's record covers only its last attempt: the seconds an interrupted attempt took are not known
    disk.write_json(os.path.join(out, STEP_RECORD), dict(command="python " + " ".join(cmd),
                                                           wall_seconds=time.time() - t0, commit=code,
                                                           finished=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                                                           machine=machine()))


def provenance() -> dict:
    """The command, commit, machine and wall time behind a results file: this invocation's own seconds (its
    tabulation and the steps it ran) plus the recorded seconds of the steps it found done; None if any is unrecorded."""
    steps, unrecorded = [], []
    for out in dict.fromkeys(_STEPS):
        path = os.path.join(out, STEP_RECORD)
        rec = json.load(open(path)) if os.path.isfile(path) else None
        if out in _CACHED:
            rec = None if _CACHED[out] is None else dict(command="held-out evaluation", wall_seconds=_CACHED[out])
        steps.append(dict(out=out, command=rec and rec["command"], wall_seconds=rec and rec["wall_seconds"],
                          commit=rec and rec.get("commit"), this_run=out in _RAN))
        if rec is None:
            unrecorded.append(out)
    own = time.time() - _STARTED[0]
    earlier = sum(s["wall_seconds"] for s in steps if s["wall_seconds"] is not None and not s["this_run"])
    return dict(command="python experiments/run.py " + " ".join(sys.argv[1:]), commit=_COMMIT[0] or commit(),
                steps_commits=sorted({s["commit"] for s in steps if s.get("commit")}), machine=machine(),
                finished=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), this_invocation_seconds=own,
                wall_seconds=None if unrecorded else own + earlier, steps=steps, unrecorded_steps=unrecorded)


def adapt_run(cfg: ExpConfig, out: str, args: list[str]) -> dict:
    tokens = [] if "--max-tokens" in args else ["--max-tokens", str(cfg.adapt_tokens)]
    run(cfg, "adapt.py", out, [*tokens, *args], "results.json")
    with open(os.path.join(out, "results.json")) as f:
        return json.load(f)


def embedded_paths(cfg: ExpConfig) -> tuple[str, str, int, ModelConfig]:
    """Model folder, data folder, SAE layer and model config, building the embedded model and corpus on first use."""
    model = cfg.model or embedded.model()
    data_dir = cfg.data or (embedded.corpus() if cfg.model is None else embedded.corpus_for(cfg.model))
    with open(os.path.join(resolve_model_dir(model), "config.json")) as f:
        mcfg = ModelConfig.from_hf(json.load(f))
    return model, data_dir, cfg.layer if cfg.layer is not None else mcfg.n_layer // 2, mcfg


def train_topk(cfg: ExpConfig, out: str, layer: int, tokens: int, arch: str = "topk", extra=()) -> str:
    run(cfg, "train_sae.py", out, ["--recipe", cfg.recipe, "--layer", str(layer), "--arch", arch, "--k", str(cfg.k),
                                   "--expansion", str(cfg.expansion), "--max-tokens", str(tokens), *extra],
        "history.json")
    return out


def main_sae(cfg: ExpConfig, layer: int) -> str:
    """The SAE the rank and multi experiments adapt: on the tiny model, the embedded one `python adapt.py` uses."""
    if tiny(cfg) and layer == embedded_paths(cfg)[2]:
        return embedded.sae(layer)
    return train_topk(cfg, os.path.join(cfg.out, f"sae-L{layer}"), layer, cfg.sae_tokens)


def held_out_batches(cfg: ExpConfig, device) -> tuple[adapt.AdaptConfig, list[torch.Tensor]]:
    """adapt.py's settings for this model and exactly the held-out batches it evaluates on."""
    from data import TokenLoader
    a = common.fill(adapt.AdaptConfig(), set(), adapt.TINY if tiny(cfg) else {})
    micro = a.micro_batch or a.batch_size
    val = TokenLoader(embedded_paths(cfg)[1], "val", micro, a.seq_len, 0, 1, a.seed, shuffle=False, device=device)
    return a, [val.next_batch() for _ in range(max(1, a.eval_tokens // (micro * a.seq_len)))]


@torch.no_grad()
def held_out(cfg: ExpConfig, sae_dirs: list[str], layers: list[int] | None = None) -> dict:
    """CE of the original model and with the SAE(s) spliced, on exactly the held-out tokens adapt.py evaluates on."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = Transformer.from_pretrained(embedded_paths(cfg)[0], device=device).requires_grad_(False)
    saes = load_saes(sae_dirs, layers or None, model, device)
    a, batches = held_out_batches(cfg, device)
    res = splice.evaluate(model, saes, batches, splice.kept_tokens(saes, model.cfg, a.sae_positions), chunk=a.kl_chunk,
                          amp=common.autocast(device, a.autocast))
    return dict(ce_base=res["ce_base"], ce_sae=res["ce_sae"], kl_sae=res["kl_sae"])


def save(name: str, results: dict, table: str):
    os.makedirs(RESULTS, exist_ok=True)
    results.pop("wall_seconds", None)  # the invocation's time alone: 0.1 s when every step was done already
    results["provenance"] = provenance()
    results["wall_seconds"] = results["provenance"]["wall_seconds"]
    with open(os.path.join(RESULTS, name + ".json"), "w") as f:
        json.dump(results, f, indent=2)
    with open(os.path.join(RESULTS, name + ".md"), "w") as f:
        f.write(table + "\n")
    print(table)


def pyplot():
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        return plt
    except ImportError:
        print("figure skipped: matplotlib is not installed (pip install matplotlib)")
        return None


def savefig(plt, fig, name: str):
    fig.savefig(os.path.join(RESULTS, name + ".png"), dpi=130, bbox_inches="tight")
    plt.close(fig)


# ----------------------------------------------------------------------------------------------------------------------
# 1. Loss vs compute (Fig. 1, 5; Tables 1, 2)


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
    sae_cfg = common.fill(train_sae.TrainSAEConfig(), set(), h["config"], "saved")
    topk_flops = lambda p: sae_module.run_flops(sae_cfg, mcfg, topk_step(p), sae_module.auxk_steps(h["history"],
                                                                                              topk_step(p)))
    e2e_cfg = common.fill(train_e2e.E2EConfig(), set(), disk.torch_load(os.path.join(e2e, "state.pt"), "cpu",
                                                                          "e2e state")["config"], "saved")
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
        points["e2e"].append(dict(pct=p, time=e2e_time(p), flops=e2e_tokens(p) * splice.e2e_step_flops(e2e_cfg, mcfg),
                                  backward=e2e_tokens(p) // e2e_cfg.seq_len,
                                  ce=cache[os.path.join(e2e, f"ckpt_{p:03d}")]["ce_sae"]))
    for p in map(int, cfg.frontier_ckpts.split(",")):
        ckpt = os.path.join(topk, f"ckpt_{p:03d}")
        res = adapt_run(cfg, os.path.join(root, f"lora-{p:03d}"), ["--sae", ckpt, "--layer", str(layer),
                                                                    "--max-tokens", str(cfg.lora_tokens)])
        a = res["config"]
        flops = res["train_tokens"] * splice.adapt_step_flops(mcfg, [(layer, SAE.from_pretrained(ckpt))], res["lora_layers"],
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
             "Training FLOPs to reach each CE (sae.run_flops, splice.e2e_step_flops, splice.adapt_step_flops) and "
             "backward passes through the model to reach it (sequences, as Sec. 4.2 counts; TopK + LoRA: its LoRA's):",
             "",
             *flops_table, "",
             f"Backward passes through the model: e2e {last['e2e']['backward']:,} sequences of {e2e_cfg.seq_len} "
             f"tokens for its whole run, each TopK + LoRA adaptation {seq:,} of {a['seq_len']}: "
             f"{last['e2e']['backward'] / max(seq, 1):.1f}x as many (paper: 130x on Gemma-2-2B, 40x on "
             f"Llama-3.2-1B); the TopK SAE none (its {total_steps:,} steps forward "
             f"{sae_module.forward_windows(sae_cfg, total_steps):,} windows through blocks 0..{layer} only). Final "
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
        savefig(plt, fig, "frontier")


# ----------------------------------------------------------------------------------------------------------------------
# 2. LoRA rank (Fig. 3)


def rank(cfg: ExpConfig):
    _, _, layer, _ = embedded_paths(cfg)
    sae = main_sae(cfg, layer)
    res = {r: adapt_run(cfg, os.path.join(cfg.out, "rank", f"r{r}"), ["--sae", sae, "--layer", str(layer),
                                                                      "--rank", str(r)]) for r in (1, 4, 16, 64)}
    table = ["| rank | trainable params | CE with SAE + LoRA | gap closed | KL to original | LoRA time |",
             "|---|---|---|---|---|---|"]
    r0 = res[1]
    for r, x in res.items():
        table.append(f"| {r} | {lora_params(cfg, r, x['lora_layers']) / 1e6:.2f}M | {x['ce_sae_lora']:.4f} | "
                     f"{x['gap_closed']:.1%} | {x['kl_sae_lora']:.4f} | {x['train_seconds']:.0f} s |")
    table += ["", f"CE original {r0['ce_base']:.4f}, with SAE {r0['ce_sae']:.4f} (KL {r0['kl_sae']:.4f})."]
    save("rank", dict(runs={r: strip(x) for r, x in res.items()}, config=asdict(cfg)), "\n".join(table))
    plt = pyplot()
    if plt:
        fig, ax = plt.subplots(figsize=(5, 3.5))
        ax.plot(list(res), [100 * x["gap_closed"] for x in res.values()], "o-")
        ax.set(xscale="log", xlabel="LoRA rank", ylabel="CE gap closed (%)", title="Scaling with rank (cf. Fig. 3)")
        ax.set_xticks(list(res), [str(r) for r in res])
        savefig(plt, fig, "rank")


def lora_params(cfg: ExpConfig, r: int, layers: list[int]) -> int:
    return r * sum(i + o for i, o in embedded_paths(cfg)[3].block_linears().values()) * len(layers)


def strip(res: dict) -> dict:
    return {k: v for k, v in res.items() if k != "history"}


# ----------------------------------------------------------------------------------------------------------------------
# 3. Single-layer adapters (Fig. 9) and 5. JumpReLU (Gemma Scope style): one JumpReLU SAE early in the model


def jumprelu_sae(cfg: ExpConfig) -> tuple[str, int]:
    """A JumpReLU SAE one layer after the first, so several layers lie after it (the layers LoRA may touch)."""
    layer = 0 if tiny(cfg) else (cfg.layer if cfg.layer is not None else 12)
    out = os.path.join(cfg.out, f"sae-jumprelu-L{layer}")
    # thresholds start at 1e-3 and Adam moves them about lr per step: on a short budget only a larger lr and L0
    # coefficient make the SAE sparse (Gemma Scope's values need billions of tokens)
    extra = ["--l0-coef", "0.1", "--lr", "1e-2"] if tiny(cfg) else []
    return train_topk(cfg, out, layer, cfg.jumprelu_tokens, "jumprelu", extra), layer


@torch.no_grad()
def l0_of(cfg: ExpConfig, sae_dir: str, layer: int, adapter: str | None = None) -> float:
    """Mean active latents of the SAE on held-out activations of (the adapted) model at its layer, BOS excluded."""
    from formats.peft import load_adapter
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = Transformer.from_pretrained(embedded_paths(cfg)[0], device=device).requires_grad_(False)
    if adapter:
        load_adapter(model, adapter)
    sae = SAE.from_pretrained(sae_dir, device=device)
    total, n = 0.0, 0
    for idx in held_out_batches(cfg, device)[1]:  # every window starts with BOS: position 0 is left out
        x = model(idx, stop_at=layer)[:, 1:].reshape(-1, model.cfg.d_model)
        total, n = total + float((sae.encode(x) != 0).sum()), n + x.shape[0]
    return total / n

def layers(cfg: ExpConfig):
    sae, layer = jumprelu_sae(cfg)
    n_layer = embedded_paths(cfg)[3].n_layer
    root = os.path.join(cfg.out, "layers")
    runs = {"after": adapt_run(cfg, os.path.join(root, "after"), ["--sae", sae, "--lora-layers", "after"])}
    for i in range(layer + 1, n_layer):
        runs[str(i)] = adapt_run(cfg, os.path.join(root, f"layer-{i}"), ["--sae", sae, "--lora-layers", str(i)])
    a = runs["after"]
    table = ["| adapters on | trainable params | CE with SAE + LoRA | gap closed | KL to original |",
             "|---|---|---|---|---|"]
    for name, x in runs.items():
        label = f"layers {layer + 1}..{n_layer - 1} (all after)" if name == "after" else f"layer {name} only"
        table.append(f"| {label} | {lora_params(cfg, 64, x['lora_layers']) / 1e6:.2f}M | {x['ce_sae_lora']:.4f} | "
                     f"{x['gap_closed']:.1%} | {x['kl_sae_lora']:.4f} |")
    table += ["", f"JumpReLU SAE at layer {layer}; CE original {a['ce_base']:.4f}, with SAE {a['ce_sae']:.4f}."]
    save("layers", dict(sae=sae, layer=layer, runs={k: strip(v) for k, v in runs.items()}, config=asdict(cfg)), "\n".join(table))
    plt = pyplot()
    if plt:
        fig, ax = plt.subplots(figsize=(5, 3.5))
        names = [k for k in runs if k != "after"] + ["after"]
        ax.bar([f"L{k}" if k != "after" else "all after" for k in names],
               [runs[k]["ce_sae_lora"] for k in names], color=["C0"] * (len(names) - 1) + ["C1"])
        ax.axhline(a["ce_sae"], color="C3", ls="--", label=f"with SAE, no LoRA ({a['ce_sae']:.3f})")
        ax.axhline(a["ce_base"], color="gray", ls="--", label=f"original ({a['ce_base']:.3f})")
        lo = a["ce_base"] - 0.25 * (a["ce_sae"] - a["ce_base"])
        ax.set(ylim=(lo, a["ce_sae"] + 0.25 * (a["ce_sae"] - a["ce_base"])), ylabel="held-out CE (nats)",
               xlabel="adapted layer", title=f"Single-layer LoRA, SAE at layer {layer} (cf. Fig. 9)")
        ax.legend(fontsize=8)
        savefig(plt, fig, "layers")


def jumprelu(cfg: ExpConfig):
    sae, layer = jumprelu_sae(cfg)
    root = os.path.join(cfg.out, "layers")
    after = adapt_run(cfg, os.path.join(root, "after"), ["--sae", sae, "--lora-layers", "after"])
    # the counter-example the default refuses: adapters before the SAE too, which moves its inputs across thresholds
    every = adapt_run(cfg, os.path.join(cfg.out, "jumprelu", "all"), ["--sae", sae, "--lora-layers", "all",
                                                                      "--allow-before-jumprelu"])
    l0 = dict(original=l0_of(cfg, sae, layer), after=l0_of(cfg, sae, layer, os.path.join(root, "after", "adapter")),
              all=l0_of(cfg, sae, layer, os.path.join(cfg.out, "jumprelu", "all", "adapter")))
    table = ["| adapters on | L0 of the SAE | CE with SAE + LoRA | gap closed | KL to original |",
             "|---|---|---|---|---|",
             f"| none | {l0['original']:.2f} | {after['ce_sae']:.4f} | - | {after['kl_sae']:.4f} |",
             f"| layers after the SAE (default) | {l0['after']:.2f} | {after['ce_sae_lora']:.4f} | "
             f"{after['gap_closed']:.1%} | {after['kl_sae_lora']:.4f} |",
             f"| all layers (--allow-before-jumprelu) | {l0['all']:.2f} | {every['ce_sae_lora']:.4f} | "
             f"{every['gap_closed']:.1%} | {every['kl_sae_lora']:.4f} |",
             "", f"JumpReLU SAE at layer {layer}; CE original {after['ce_base']:.4f}."]
    save("jumprelu", dict(sae=sae, layer=layer, l0=l0, after=strip(after), all=strip(every), config=asdict(cfg)), "\n".join(table))


# ----------------------------------------------------------------------------------------------------------------------
# 4. Several SAEs at once (Fig. 6)


def multi(cfg: ExpConfig):
    _, _, layer, mcfg = embedded_paths(cfg)
    n_layer = mcfg.n_layer
    # spread out as in the paper (1 SAE at the middle; then as far apart as the model allows)
    sets = [[layer], [1, 3], [1, 2, 3]] if n_layer == 4 else [[n_layer // 2], [n_layer // 3, 2 * n_layer // 3],
                                                               [n_layer // 4, n_layer // 2, 3 * n_layer // 4]]
    saes = {layer: main_sae(cfg, layer)}
    for ls in sets:
        for i in ls:
            if i not in saes:
                saes[i] = train_topk(cfg, os.path.join(cfg.out, f"sae-L{i}-extra"), i, cfg.extra_sae_tokens)
    runs = {}
    for ls in sets:
        args = [x for i in ls for x in ("--sae", saes[i], "--layer", str(i))]
        runs[",".join(map(str, ls))] = adapt_run(cfg, os.path.join(cfg.out, "multi", "L" + "-".join(map(str, ls))),
                                                 args)
    table = ["| SAEs at layers | compound CE before LoRA | after LoRA | gap closed | KL before -> after |",
             "|---|---|---|---|---|"]
    for name, x in runs.items():
        table.append(f"| {name} | {x['ce_sae']:.4f} | {x['ce_sae_lora']:.4f} | {x['gap_closed']:.1%} | "
                     f"{x['kl_sae']:.4f} -> {x['kl_sae_lora']:.4f} |")
    table += ["", f"CE of the original model {next(iter(runs.values()))['ce_base']:.4f}."]
    save("multi", dict(saes=saes, runs={k: strip(v) for k, v in runs.items()}, config=asdict(cfg)), "\n".join(table))
    plt = pyplot()
    if plt:
        fig, ax = plt.subplots(figsize=(5, 3.5))
        xs = range(len(runs))
        ax.bar([x - 0.2 for x in xs], [r["ce_sae"] for r in runs.values()], 0.4, label="SAEs spliced")
        ax.bar([x + 0.2 for x in xs], [r["ce_sae_lora"] for r in runs.values()], 0.4, label="SAEs + LoRA")
        base = next(iter(runs.values()))["ce_base"]
        ax.axhline(base, color="gray", ls="--", label=f"original ({base:.3f})")
        ax.set_xticks(list(xs), [f"{len(k.split(','))} SAE{'s' if ',' in k else ''}\n({k})" for k in runs])
        ax.set(ylim=(base - 0.2, None), ylabel="compound CE (nats)", title="Several SAEs at once (cf. Fig. 6)")
        ax.legend(fontsize=8)
        savefig(plt, fig, "multi")


# ----------------------------------------------------------------------------------------------------------------------
# 6. Steering (Sec. 5.2) and the benchmarks of Sec. 5.3 as functional checks, inputs from held-out documents


def checks(cfg: ExpConfig):
    from experiments import checks as inputs  # the latent, steering texts and questions; the report
    _, _, layer, mcfg = embedded_paths(cfg)
    sae, root = main_sae(cfg, layer), os.path.join(cfg.out, "checks")
    run(cfg, "experiments/checks.py", os.path.join(root, "inputs"), ["--sae", sae, "--layer", str(layer)],
        "inputs.json", resume=False)
    with open(os.path.join(root, "inputs", "inputs.json")) as f:
        info = json.load(f)
    adapter = cfg.adapter
    if adapter is None:  # python adapt.py's run on this SAE
        adapt_run(cfg, os.path.join(root, "adapt"), ["--sae", sae, "--layer", str(layer)])
        adapter = os.path.join(root, "adapt", "adapter")
    f = info["files"]
    run(cfg, "eval.py", os.path.join(root, "eval"),
        ["--sae", sae, "--layer", str(layer), "--adapter", adapter, "--latent", str(info["choice"]["latent"]),
         "--steering-pos", f["pos"], "--steering-neg-val", f["neg_val"],
         *[x for k in f if k.startswith("neg/") for x in ("--steering-neg", f[k])],
         "--alphas", "1,2,4,8,16,32",  # eval.py's grid less 0: both models are compared while steering
         "--hellaswag", f["hellaswag"], "--truthfulqa-gen", "corpus",
         "--eval-tokens", "32768", "--distances", "false"], "eval.json", resume=False)  # CE on adapt.py's tokens
    with open(os.path.join(root, "eval", "eval.json")) as fh:
        ev = json.load(fh)
    with torch.device("meta"):
        n_params = sum(p.numel() for p in Transformer(mcfg).parameters())
    results, table = inputs.report(info, ev, n_params)
    save("checks", dict(**results, adapter=adapter, config=asdict(cfg)), table)


# ----------------------------------------------------------------------------------------------------------------------
# 7. The default run evaluated: SAEBench (Sec. 5.1, Table 6), per-token changes (Sec. 6.1), distances (Sec. 6.2)


def default(cfg: ExpConfig):
    """python adapt.py (the tiny preset), then python eval.py --adapter <its adapter> --saebench on eval.py's tokens."""
    name = "default" if cfg.seed is None else f"default-seed{cfg.seed}"
    root = os.path.join(cfg.out, name)
    res = adapt_run(cfg, os.path.join(root, "adapt"), [] if cfg.seed is None else ["--seed", str(cfg.seed)])
    run(cfg, "eval.py", os.path.join(root, "eval"), ["--adapter", os.path.join(root, "adapt", "adapter"), "--saebench"],
        "eval.json", resume=False)
    with open(os.path.join(root, "eval", "eval.json")) as f:
        ev = json.load(f)
    with open(os.path.join(root, "eval", "eval.md")) as f:
        md = f.read()
    head = (f"`adapt.py` on its {res['positions']:,} held-out positions: CE original {res['ce_base']:.4f}, with SAE "
            f"{res['ce_sae']:.4f}, with SAE + LoRA {res['ce_sae_lora']:.4f}, {res['gap_closed']:.1%} of the gap closed "
            f"(KL {res['kl_sae']:.4f} -> {res['kl_sae_lora']:.4f}); {res['train_seconds']:.0f} s of training steps.")
    save(name, dict(adapt=strip(res), eval=ev, config=asdict(cfg)), head + "\n\n`eval.py`:\n\n" + md)


# ----------------------------------------------------------------------------------------------------------------------
# 8. Numbers the claims table derives from the other results files (ratios, differences, standard errors)


def derive(cfg: ExpConfig):
    """Arithmetic on experiments/results/*.json, each quantity with its formula, so that every number the claims
    table quotes is in a results file; a file not there yet is skipped (its quantities are absent)."""
    def load(name):
        path = os.path.join(RESULTS, name + ".json")
        return json.load(open(path)) if os.path.isfile(path) else None
    out, rows = {}, []

    def put(key, value, formula):
        out[key] = dict(value=value, formula=formula)
        rows.append(f"| {key} | {value:.6g} | {formula} |")
    if (j := load("jumprelu")) is not None:
        put("jumprelu_l0_change_all_layers", j["l0"]["all"] / j["l0"]["original"] - 1, "L0 all / L0 original - 1")
        put("jumprelu_gap_after_lora_nats", j["after"]["ce_sae_lora"] - j["after"]["ce_base"],
            "CE with SAE + LoRA (after) - CE original")
    if (r := load("rank")) is not None:
        r64, r4 = r["runs"]["64"], r["runs"]["4"]
        put("topk_gap_after_lora_nats", r64["ce_sae_lora"] - r64["ce_base"], "rank 64: CE with SAE + LoRA - original")
        put("rank4_over_rank64_train_seconds", r4["train_seconds"] / r64["train_seconds"],
            "step-rate variation under the load: rank 4's training seconds / rank 64's (fewer FLOPs, more time)")
        with torch.device("meta"):
            n_model = sum(p.numel() for p in Transformer(embedded_paths(cfg)[3]).parameters())
        put("model_params", n_model, "parameters of the base model")
        for k in r["runs"]:
            put(f"rank{k}_param_share", lora_params(cfg, int(k), r["runs"][k]["lora_layers"]) / n_model,
                f"rank-{k} LoRA parameters on all layers / the base model's")
    if (l := load("layers")) is not None:
        g = {k: v["gap_closed"] for k, v in l["runs"].items()}
        put("layer1_share_of_all_after", g["1"] / g["after"], "gap closed, layer 1 only / layers after the SAE")
        singles = [v for k, v in g.items() if k != "after"]
        put("single_layer_spread_points", 100 * (max(singles) - min(singles)), "max - min gap closed, single layers")
    if (m := load("multi")) is not None:
        one, three = m["runs"]["2"], m["runs"]["1,2,3"]
        put("multi3_needed_gap_closed", (three["ce_sae"] - one["ce_sae"]) / (three["ce_sae"] - three["ce_base"]),
            "share of the 3-SAE gap to close to get below one SAE without LoRA: (CE3 - CE1) / (CE3 - original)")
        put("multi3_after_lora_above_one_sae_nats", three["ce_sae_lora"] - one["ce_sae"],
            "3 SAEs after LoRA - one SAE without LoRA")
        for k, v in m["runs"].items():
            put(f"multi_{k.replace(',', '')}_initial_gap_nats", v["ce_sae"] - v["ce_base"], "compound CE - original")
    for name in ("frontier", "frontier-e2e4m"):
        if (f := load(name)) is None:
            continue
        base = f["ce_base"]
        for q in f["points"]["topk_lora"]:
            put(f"{name}_ckpt{q['pct']}_initial_gap_nats", q["ce_before"] - base, "CE with the checkpoint - original")
            put(f"{name}_ckpt{q['pct']}_gap_closed", (q["ce_before"] - q["ce"]) / (q["ce_before"] - base),
                "gap closed by the checkpoint's 250k-token adaptation")
        lora, e2e = f["points"]["topk_lora"][-1], f["points"]["e2e"][-1]
        put(f"{name}_e2e_minus_topk_lora_final_nats", e2e["ce"] - lora["ce"], "final CE: e2e - TopK + LoRA")
        put(f"{name}_lora_mflop_per_token", lora["lora_flops"] / (lora["backward"] * cfg_seq(f)) / 1e6,
            "LoRA FLOPs / its tokens (sequences x 256)")
        put(f"{name}_e2e_mflop_per_token", e2e["flops"] / (e2e["backward"] * cfg_seq(f)) / 1e6,
            "e2e FLOPs / its tokens")
    if (c := load("checks")) is not None:
        ce = c["core"]["ce"]
        put("checks_lora_minus_original_ce", ce["lora"] - ce["original"], "CE of the LoRA model without the SAE - "
                                                                            "original")
        for bench, metrics in (("multiple_choice", ("acc", "acc_norm")),
                               ("truthfulqa_gen", ("bleu_acc", "rouge1_acc", "rouge2_acc"))):
            b = c[bench]
            for a, z in (("sae", "sae_lora"), ("original", "lora")):
                for mt in metrics:
                    diff = 100 * (b[z][mt] - b[a][mt])
                    se = 100 * math.hypot(b[z][mt + "_se"], b[a][mt + "_se"])
                    put(f"{bench}_{mt}_{z}_minus_{a}", diff, f"{z} - {a}, % points")
                    put(f"{bench}_{mt}_{z}_minus_{a}_se", se, "standard error of that difference, unpaired: "
                                                                "hypot of the two")
                    put(f"{bench}_{mt}_{z}_minus_{a}_in_se", diff / se, "the difference in those standard errors")
    for name in sorted(os.path.basename(x)[:-5] for x in glob.glob(os.path.join(RESULTS, "default*.json"))):
        g = load(name)["eval"]
        pt, thr = g["groups"][0]["per_token"], (2, 5, 10, 20, 50, 100, 500)
        edges = pt["bin_edges"]
        inside = [i for i in range(len(edges) - 1) if edges[i] >= 1e-2 * (1 - 1e-9) and edges[i + 1] <= 1 + 1e-9]
        for kind in ("improved", "degraded"):
            put(f"{name}_nats_{kind}_share_0.01_to_1", sum(pt[f"nats_{kind}_per_bin"][i] for i in inside)
                / sum(pt[f"nats_{kind}_per_bin"]), f"nats {kind} by tokens changed by 0.01 to 1 nats / all nats {kind}")
        hist = [a + b for a, b in zip(pt["hist_improved"], pt["hist_degraded"])]
        put(f"{name}_tokens_changed_share_0.01_to_1", sum(hist[i] for i in inside) / sum(hist),
            "tokens changed by 0.01 to 1 nats (either way) / all changed tokens")
        sb = g["saebench"]["settings"]
        for metric, key in (("scr", "scr_metric_threshold_{}"), ("tpp", "tpp_threshold_{}_total_metric")):
            lora, base = ([sb[m][metric][key.format(t)] for t in thr] for m in ("adapted", "base"))
            put(f"{name}_{metric}_mean_lora", sum(lora) / len(lora), f"{metric} mean over thresholds {thr}, LoRA")
            put(f"{name}_{metric}_mean_base", sum(base) / len(base), f"{metric} mean over thresholds {thr}, base")
            put(f"{name}_{metric}_max_lora", max(lora), f"{metric} max over the thresholds, LoRA")
            put(f"{name}_{metric}_max_base", max(base), f"{metric} max over the thresholds, base")
            put(f"{name}_{metric}_thresholds_lower", sum(round(x, 3) < round(y, 3) for x, y in zip(lora, base)),
                "thresholds where LoRA < base (3 decimals, as shown)")
            put(f"{name}_{metric}_thresholds_equal", sum(round(x, 3) == round(y, 3) for x, y in zip(lora, base)),
                "thresholds where LoRA = base (3 decimals)")
    save("derived", dict(values=out, config=asdict(cfg)),
         "| quantity | value | formula |\n| --- | --- | --- |\n" + "\n".join(rows))


def cfg_seq(results: dict) -> int:
    """Sequence length of a frontier run's adaptations (backward passes count sequences of it)."""
    return 256 if results["config"].get("model") is None else 1024


EXPERIMENTS = dict(frontier=frontier, rank=rank, layers=layers, multi=multi, jumprelu=jumprelu, checks=checks, default=default,
                   derive=derive)

def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    names = [a for a in argv[:1] if not a.startswith("-")]
    if not names or names[0] not in (*EXPERIMENTS, "all"):
        sys.exit(f"usage: python experiments/run.py {{{'|'.join(EXPERIMENTS)}|all}} [--flags]; see the docstring")
    cfg, _ = common.parse_args(ExpConfig, argv[1:])
    _COMMIT[0] = commit()
    for name in (EXPERIMENTS if names[0] == "all" else [names[0]]):
        print(f"== {name}", flush=True)
        _STEPS.clear(), _RAN.clear(), _CACHED.clear()
        _STARTED[0] = time.time()
        EXPERIMENTS[name](cfg)


if __name__ == "__main__":
    main()
