"""
Verify the GPU path in one command: numerics against references, the embedded pipeline, the adapt step at the paper's
shape against transformers + peft, torchrun with NCCL and FSDP2, and SAE training; one JSON and one markdown table.

    python tools/gpu_check.py --out DIR                   # one CUDA GPU, within --budget seconds (15 minutes)
    python tools/gpu_check.py --quick --out DIR           # every part at tiny shapes on the CPU (tests/test_gpu_check.py)
    python tools/gpu_check.py --parts adapt --budget 300 --out DIR    # one part, with the whole budget
    python tools/gpu_check.py --parts adapt --shapes gemma-2-2b:8x1024,gemma-3-1b:1x1024 --budget 450 --out DIR

A GPU lent for 15 minutes in runs of at most 10: two runs (README.md, "Speed"), the adapt step first, since it
matters most; every number is in OUT/parts/PART.json as soon as it is measured, so a run killed from outside keeps
what it had.

The parts:
  1 numerics  the model against transformers (Gemma-2 with its sliding window and soft-caps, Llama-3; fp32, bf16); the
              compiled passes and KL chunk against splice.kl_reference (Eq. 7) in value and gradient; flex_attention
              against the math path at head_dim 256, forward and backward; no graph breaks; fused TopK SAE vs dense
  2 pipeline  `python adapt.py` from an empty cache: each stage's time, the gap closed (with less time than the
              full recipe is given, its stages run by their scripts with fewer steps, labelled so)
  3 adapt     one adaptation step at Gemma-2-2B's shape (bench.py's functions; --shapes: others): ours compiled in
              bf16, from an empty compile cache, against transformers + peft as the authors ran it (fp32, eager) and
              at its best: cold start, tokens/s, MFU, peak memory
  4 torchrun  `torchrun --nproc_per_node 1 adapt.py`, on NCCL, and with --fsdp: the same adapter
  5 sae       `bench.py sae`: train_sae.py's loop against the paper's

Each part runs in its own process with its own deadline (a share of --budget, plus what earlier parts left unused);
a part that fails or runs out of time is recorded with a one-line error and the numbers it had, and the rest still
run. The JSON and the table are rewritten after every part. Exit code 0 when every part passed, 1 otherwise.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import socket
import sys
import tempfile
import time
from dataclasses import dataclass, field

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # runnable by path (python tools/X.py) as well as with -m

from plumbing import common
from plumbing import distributed
from formats import disk
from tools.gpu_numerics import part_numerics  # noqa: F401  (part 1, run by name)
from tools.gpu_report import environment, write_report
from tools.processes import cpu_seconds, one_line, one_line_error, run_proc, tail



@dataclass
class CheckConfig:
    """Verify the GPU path: numerics, the embedded pipeline, the paper-shape adapt step, torchrun, SAE training."""
    out: str = "out/gpu-check"  # gpu_check.json, gpu_check.md and gpu_check.log (each part's output) go here
    quick: bool = False  # every part at tiny shapes, on the CPU unless --device says otherwise (the test suite runs
    # this, so that the check cannot rot between GPU days)
    parts: list[str] = field(default_factory=list)  # numerics | pipeline | adapt | torchrun | sae; none: all five
    shapes: list[str] = field(default_factory=list)  # part adapt: NAME:BxT, model.py's preset at batch x tokens, of
    # gemma-2-2b:1x1024, gemma-2-2b:8x1024, gemma-3-1b:1x1024, llama-3.2-1b:1x1024; none: the first (the paper's)
    budget: float | None = None  # seconds for the whole check, shared among the parts in proportion to their
    # shares; none: 900 (15 minutes) on a GPU, 900 quick
    device: str = "auto"  # auto | cuda | cuda:N | cpu (the full check needs a GPU)
    part: str = ""  # internal: run this one part in this process
    record: str = ""  # internal: the part's JSON record
    work: str = ""  # internal: the part's scratch folder
    deadline: float = 0.0  # internal: the part's deadline (seconds since the epoch)


# name -> (number, what it checks, its share in seconds). The shares are sized from the first H200 run (2026-12-04,
# experiments/README.md), where torch.compile's cold start dominated: tens of seconds per compiled graph, over a minute
# for the Gemma-2-2B step. Run in this order: the pipeline last, with what the others leave unused.
PARTS = {
    "numerics": (1, "numerics on the device", 180),
    "adapt": (3, "adapt step at Gemma-2-2B's shape", 240),
    "sae": (5, "bench.py sae", 60),
    "torchrun": (4, "torchrun: NCCL and FSDP2", 50),
    "pipeline": (2, "python adapt.py from an empty cache", 240),
}
MARGIN = 15  # seconds kept for starting up and writing the report


def main(argv=None):
    t0 = time.time()
    cfg, typed = common.parse_args(CheckConfig, argv)
    if cfg.quick and "device" not in typed:
        cfg.device = "cpu"
    dev = distributed.pick_device(cfg.device)
    if cfg.part:
        return run_part(cfg, dev)
    if dev.type != "cuda" and not cfg.quick:
        raise ValueError("the full check runs on a CUDA GPU and none is in use here; --quick runs every part at tiny "
                         "shapes on the CPU")
    names = [n for spec in cfg.parts for n in spec.split(",") if n] or list(PARTS)  # --parts a,b or --parts a --parts b
    for name in names:
        if name not in PARTS:
            raise ValueError(f"--parts {name!r}: expected one of {', '.join(PARTS)}")
    names = [n for n in PARTS if n in names]
    shapes = [x for spec in cfg.shapes for x in spec.split(",") if x]
    for spec in shapes:
        shape_config(spec, dev)  # a bad one: one line now, not after the other parts
    budget = cfg.budget or 900.0
    if budget <= MARGIN + len(names):
        raise ValueError(f"--budget {budget:g}: {MARGIN} s go to starting up and writing the report; give more")
    scale = (budget - MARGIN) / sum(PARTS[n][2] for n in names)
    report = dict(command="python " + " ".join([os.path.basename(__file__), *(sys.argv[1:] if argv is None else argv)]),
                  mode="quick" if cfg.quick else "full", budget_s=budget, environment=environment(dev), parts={})
    tmp = tempfile.mkdtemp(prefix="lorasae-gpu-check-")
    log_text = []
    write_report(cfg.out, dict(report, wall_s=0.0, passed=[], failed=[]), log_text)
    try:
        share_end = t0
        for name in names:
            share_end += PARTS[name][2] * scale
            deadline = min(share_end, t0 + budget - MARGIN)
            report["parts"][name] = run_guarded(cfg, dev, name, deadline, tmp, log_text, shapes)
            report["wall_s"] = time.time() - t0
            report["passed"] = [n for n, p in report["parts"].items() if p["ok"]]
            report["failed"] = [n for n, p in report["parts"].items() if not p["ok"]]
            write_report(cfg.out, report, log_text)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    with open(os.path.join(cfg.out, "gpu_check.md")) as f:
        print("\n" + f.read())
    print(f"gpu_check: {len(report['passed'])} of {len(names)} parts passed in {report['wall_s']:.0f} s; "
          f"{os.path.join(cfg.out, 'gpu_check.json')}")
    sys.exit(0 if not report["failed"] else 1)


def run_guarded(cfg, dev, name: str, deadline: float, tmp: str, log_text: list, shapes=()) -> dict:
    """One part in a child process, killed with everything it started at its deadline; its record, whatever it had.
    The record (rewritten by the part after every number) and the part's stderr go to OUT/parts/ as they come: a
    check killed from outside keeps what its running part had measured."""
    os.makedirs(os.path.join(cfg.out, "parts"), exist_ok=True)
    record, log = (os.path.join(cfg.out, "parts", f"{name}.{ext}") for ext in ("json", "log"))
    if os.path.exists(record):
        os.remove(record)  # an earlier check's
    args = [sys.executable, os.path.join(ROOT, "tools", "gpu_check.py"), f"--part={name}", f"--record={record}",
            f"--work={os.path.join(tmp, name)}", f"--deadline={deadline}", f"--device={dev.type}",
            f"--quick={cfg.quick}", *(f"--shapes={x}" for x in shapes)]
    t0, cpu0 = time.time(), cpu_seconds()
    print(f"gpu_check: part {PARTS[name][0]} ({name}), {deadline - t0:.0f} s", flush=True)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    if dev.index is not None:  # cuda:N: the part and its scripts (torchrun's too) see that GPU alone, as cuda:0
        visible = env.get("CUDA_VISIBLE_DEVICES")
        env["CUDA_VISIBLE_DEVICES"] = visible.split(",")[dev.index] if visible else str(dev.index)
    if cfg.quick:  # tiny shapes: one thread per process (threads on tiny matrices mostly wait for each other)
        env.setdefault("OMP_NUM_THREADS", "1")
    proc = run_proc(args, deadline - t0, env=env, log=log)
    rec = json.load(open(record)) if os.path.isfile(record) else {}
    if proc["timed_out"]:
        rec.update(ok=False, error=f"timed out after {time.time() - t0:.0f} s (its budget)"
                   + (f"; {rec['error']}" if rec.get("error") else ""))
    elif "ok" not in rec:
        rec.update(ok=False, error=one_line_error(proc["stderr"]) or f"exit code {proc['rc']}")
    rec.update(number=PARTS[name][0], title=PARTS[name][1], seconds=time.time() - t0, budget_s=deadline - t0,
               cpu_s=cpu_seconds() - cpu0)
    status = "pass" if rec["ok"] else f"FAIL: {rec['error']}"
    print(f"gpu_check: part {PARTS[name][0]} ({name}) {status} ({rec['seconds']:.0f} s)", flush=True)
    log_text.append(f"===== part {PARTS[name][0]} ({name}): {status}\n----- stdout\n{tail(proc['stdout'])}\n"
                    f"----- stderr\n{tail(proc['stderr'])}\n")
    return rec


# ----------------------------------------------------------------------------------------------------------------------
# Inside a part's process


class Part:
    """What a part function gets: the mode, the device, a work folder, the time left, and its record, saved whole
    after every change so that a part killed at its deadline still reports what it measured."""

    def __init__(self, cfg, dev):
        self.quick, self.dev, self.path, self.deadline = cfg.quick, dev, cfg.record, cfg.deadline
        self.tmp = cfg.work or os.path.join(os.path.dirname(os.path.abspath(cfg.record)), cfg.part)
        os.makedirs(self.tmp, exist_ok=True)
        self.shapes = [x for spec in cfg.shapes for x in spec.split(",") if x] or [SHAPES[0]]
        self.rec: dict = {}

    def put(self, **kw):
        self.rec.update(kw)
        disk.write_json(self.path, disk.jsonable(self.rec))

    def left(self) -> float:
        return self.deadline - time.time() - 3

    def check(self, name: str, fn):
        """One guarded check: fn returns [(what, error, tolerance), ...] and optionally a dict of details."""
        checks = self.rec.setdefault("checks", {})
        t0 = time.time()
        try:
            out = fn()
            triples, details = (out if isinstance(out, tuple) else (out, {}))
            checks[name] = dict(ok=all(err <= tol for _, err, tol in triples), seconds=time.time() - t0,
                                errors={w: e for w, e, _ in triples}, tolerances={w: t for w, _, t in triples},
                                **details)
        except Exception as e:  # recorded; the other checks still run
            checks[name] = dict(ok=False, seconds=time.time() - t0, error=one_line(e))
        self.put()


def run_part(cfg, dev):
    if cfg.part not in PARTS:
        raise ValueError(f"--part {cfg.part!r}: expected one of {', '.join(PARTS)}")
    p = Part(cfg, dev)
    torch.manual_seed(0)
    try:
        globals()[f"part_{cfg.part}"](p)
        p.rec["ok"] = True
    except Exception as e:
        import traceback
        traceback.print_exc()
        p.rec.update(ok=False, error=one_line(e))
    p.put()


def sub(p: Part, args, what: str = "", **kw) -> dict:
    """A command of a part, with the part's remaining time; a failure raises its one-line error."""
    t0 = time.time()
    proc = run_proc(args, p.left(), **kw)
    if proc["timed_out"]:
        what = what or os.path.basename(args[1] if args[1] != "-m" else args[2])
        raise TimeoutError(f"{what} timed out after {time.time() - t0:.0f} s")
    if proc["rc"] != 0:
        raise RuntimeError(one_line_error(proc["stderr"]) or f"exit code {proc['rc']}")
    return proc


def tiny_run_files(p: Part, family: str = "llama3", train_steps: int = 0) -> tuple[str, str, str]:
    """A tiny model (random, or trained on the tokens: then an SAE opens a CE gap), Markov token shards and a random
    TopK SAE at layer 1 (fixtures/tiny.py): what adapt.py runs on in the quick pipeline and under torchrun."""
    from fixtures.tiny import make_data, make_model, make_sae, make_trained_model
    data = make_data(os.path.join(p.tmp, "data"), n_train=20_000, n_val=4_000)
    model = os.path.join(p.tmp, "model")
    if train_steps:
        make_trained_model(model, data, family=family, steps=train_steps)
    else:
        make_model(model, family=family)
    return model, data, make_sae(os.path.join(p.tmp, "sae"), "topk", layer=1, k=2)


# ----------------------------------------------------------------------------------------------------------------------
# 2. pipeline


# The stages of `python adapt.py` from an empty cache, each ending at the first output line that matches.
STAGES = (("start-up and corpus (tokenizer, token shards)", r"^pretrain \w+: "),
          ("pretraining", r"^embedded pipeline: pretraining done"),
          ("SAE", r"^embedded pipeline: SAE training .* done"),
          ("adaptation", r"^done: CE "))
FULL_PIPELINE_S = 300  # the part's time below which it runs the shortened recipe (a guess until measured on a GPU)
# the shortened recipe: the embedded pipeline's stages run by their scripts, with fewer steps
SHORT = dict(pretrain_steps=200, sae_tokens=500_000, adapt_tokens=200_000)


def part_pipeline(p: Part):
    """The embedded pipeline from an empty cache (LORASAE_CACHE a new folder): `python adapt.py` with the full recipe
    when the part has FULL_PIPELINE_S, else its three stages run by their scripts with fewer steps, labelled. Quick:
    adapt.py on fixtures/tiny.py's files (the embedded recipe takes 45 minutes on a CPU, its shortened form minutes)."""
    import config
    from plumbing import embedded
    from pretrain import PretrainConfig
    cache, out = os.path.join(p.tmp, "cache"), os.path.join(p.tmp, "adapt")
    env = {**os.environ, "LORASAE_CACHE": cache, "PYTHONUNBUFFERED": "1"}
    t0, times = time.time(), {}
    if p.quick:
        model, data, sae = tiny_run_files(p, train_steps=80)
        times["tiny files"] = time.time() - t0
        p.put(ran="quick: fixtures/tiny.py's Markov tokens, a tiny Llama-3 trained 80 steps on them and a random "
                  "TopK SAE, then adapt.py for 1024 tokens, uncompiled (not the embedded pipeline)", stages=times)
        sub(p, [sys.executable, "adapt.py", "--model", model, "--data", data, "--sae", sae, "--seq-len", "32",
                "--batch-size", "4", "--max-tokens", "1024", "--eval-tokens", "256", "--eval-interval", "8",
                "--log-interval", "4", "--ckpt-interval", "8", "--lr", "3e-3", "--rank", "8", "--compile", "false",
                "--dropout", "0", "--out", out, f"--device={p.dev}"], env=env)
        times["adaptation"] = time.time() - t0 - times["tiny files"]
        p.put(stages=times, total_s=time.time() - t0)
    elif p.left() >= FULL_PIPELINE_S:
        p.put(ran="python adapt.py: the embedded pipeline's full recipe, LORASAE_CACHE an empty folder", stages=times)
        proc = run_proc([sys.executable, "adapt.py", "--out", out, f"--device={p.dev}"], p.left(), env=env)
        last = t0
        for stage, pattern in STAGES:
            t = next((t for t, line in proc["lines"] if re.search(pattern, line)), None)
            if t is None:
                break
            times[stage], last = t - last, t
        p.put(stages=times, total_s=time.time() - t0)
        if proc["timed_out"]:
            stage = STAGES[len(times)][0] if len(times) < len(STAGES) else "its last lines"
            raise TimeoutError(f"python adapt.py timed out after {time.time() - t0:.0f} s, in {stage}")
        if proc["rc"] != 0:
            raise RuntimeError(one_line_error(proc["stderr"]) or f"exit code {proc['rc']}")
    else:
        model, sae, data = os.path.join(cache, "model"), os.path.join(cache, "sae"), os.path.join(cache, "stdlib")
        adapt_preset = {k: v for k, v in config.preset("adapt").items() if k != "out"}
        full = (PretrainConfig.max_steps, embedded.SAE["max_tokens"], adapt_preset["max_tokens"])
        commands = (  # (stage, script, flags): each script with the settings the pipeline gives it
            (f"corpus + pretraining ({SHORT['pretrain_steps']} of {full[0]} steps)", "pretrain.py",
             dict(out=model, max_steps=SHORT["pretrain_steps"])),
            (f"SAE ({SHORT['sae_tokens']:,} of {full[1]:,} tokens)", "train_sae.py",
             dict(embedded.SAE, max_tokens=SHORT["sae_tokens"], model=model, data=data, out=sae)),
            (f"adaptation ({SHORT['adapt_tokens']:,} of {full[2]:,} tokens)", "adapt.py",
             dict(adapt_preset, max_tokens=SHORT["adapt_tokens"], model=model, sae=sae, data=data, out=out)))
        p.put(ran="shortened recipe from an empty cache: the embedded pipeline's stages by their scripts, with its "
                  "settings and fewer steps (the full recipe: --parts pipeline --budget 330)", stages=times)
        for stage, script, flags in commands:
            t = time.time()
            args = [f"--{k.replace('_', '-')}={x}" for k, v in flags.items()
                    for x in (v if isinstance(v, list) else [v])]
            sub(p, [sys.executable, script, *args, f"--device={p.dev}"], f"{script}: {stage}", env=env)
            times[stage] = time.time() - t
            p.put(stages=times, total_s=time.time() - t0)
    res = json.load(open(os.path.join(out, "results.json")))
    keep = ("ce_base", "ce_sae", "ce_sae_lora", "gap_closed", "kl_sae", "kl_sae_lora", "tokens_per_s", "steps")
    p.put(results={k: res[k] for k in keep}, summary=f"{res['gap_closed']:.1%} of the CE gap closed "
          f"({res['ce_sae']:.4f} -> {res['ce_sae_lora']:.4f}, original {res['ce_base']:.4f}); "
          + ", ".join(f"{s} {t:.0f} s" for s, t in times.items()))


# ----------------------------------------------------------------------------------------------------------------------
# 3. adapt step at the paper's shape (bench.py adapt's functions)


REFERENCE_ROW_S = 40  # what a transformers row is given ahead (a guess until measured on a GPU)
# --shapes: model.py's preset (random weights of its shape, drawn on the device) and batch x tokens per step
SHAPES = ("gemma-2-2b:1x1024", "gemma-2-2b:8x1024", "gemma-3-1b:1x1024", "llama-3.2-1b:1x1024")
SAE_LAYER = {"gemma-2-2b": 12, "gemma-3-1b": 12, "llama-3.2-1b": 8}  # the middle of the model, as in the paper


def shape_config(spec: str, dev):
    """bench.BenchConfig of one --shapes entry, NAME:BxT: rank 64 on all layers, a 16k TopK SAE in the middle, the
    whole sequence one KL chunk (the authors' full-vocabulary softmax, a chunk per sequence)."""
    from tools import bench
    name, _, bt = spec.partition(":")
    if name not in SAE_LAYER or not re.fullmatch(r"\d+x\d+", bt or "1x1024"):
        raise ValueError(f"--shapes {spec!r}: expected NAME:BxT with NAME one of {', '.join(SAE_LAYER)} "
                         f"(e.g. {SHAPES[1]})")
    batch, seq = (int(v) for v in (bt or "1x1024").split("x"))
    return bench.BenchConfig(shape=name, layer=[SAE_LAYER[name]], seq_len=seq, batch_size=batch, rank=64,
                             sae_width=16384, k=64, kl_chunk=seq, steps=5, warmup=2, device=str(dev))


def part_adapt(p: Part):
    """Per shape: ours compiled (from an empty compile cache: its cold start) against transformers + peft as the
    authors ran it and at its best. Each row is saved as it finishes: a part killed at its deadline keeps them."""
    from tools import bench
    if p.quick:
        shapes = {"tiny": bench.BenchConfig(d_model=64, n_layer=2, vocab=512, layer=[0], seq_len=32, batch_size=2,
                                            rank=4, expansion=4, k=4, kl_chunk=64, compile=False, steps=1, warmup=1,
                                            device="cpu")}
    else:
        shapes = {spec: shape_config(spec, p.dev) for spec in p.shapes}
    p.put(ran="", rows={}, speedup={}, summary="")
    built = {}
    for n, (spec, b) in enumerate(shapes.items()):
        b.autocast = "bfloat16" if p.dev.type == "cuda" else "float32"
        t0 = time.time()
        folder = os.path.join(p.tmp, f"bench-{b.shape or 'tiny'}")
        if folder not in built:  # one set of files per model (the batch shapes share it)
            bench.build_files(b, folder, p.dev)
            built[folder] = time.time() - t0
        b.model, b.sae = bench.paths(b, folder)  # the configurations' processes read these files
        mc, flops = bench.step_flops(b, folder)
        peak_dtype = "bfloat16" if p.dev.type == "cuda" else "float32"  # the GPU's bf16 peak; quick rows run fp32
        peak = common.peak_flops(p.dev, peak_dtype)
        p.rec["ran"] += ("; " if p.rec["ran"] else "") + (f"{spec}: {b.shape or 'small ' + mc.model_type} shape, "
                                                          f"random weights: d_model "
                            f"{mc.d_model}, {mc.n_layer} layers, vocabulary {mc.vocab_size}; batch {b.batch_size} x "
                            f"{b.seq_len}; LoRA rank {b.rank} on all layers; TopK SAE of "
                            f"{b.sae_width or b.expansion * mc.d_model} latents (k {b.k}) at layer {b.layer[0]}; "
                            f"{b.steps} timed steps after {b.warmup}, ours from an empty compile cache")
        p.put(build_s=built, peak_tflops=peak / 1e12,
              peak_basis=f"{peak_dtype} {'datasheet' if p.dev.type == 'cuda' else 'measured 1024^3 matmul'}")
        ours = "ours (compiled)" if b.compile else "ours (eager)"
        shape_rows = {}
        for i, (key, name) in enumerate((("ours", ours), ("authors", "transformers + peft (fp32, as the paper's code)"),
                                         ("best", "transformers + peft (same precision)"))):
            if key == "ours":  # bench.run_ours: weights stored in the autocast dtype
                amp = "no" if b.autocast == "float32" else b.autocast
                label = f"{ours[:-1]}, {b.autocast} weights, {amp} autocast)"
            else:
                dtype, attn = bench.reference_setup(mc.model_type, key == "best", b.autocast)
                amp = b.autocast if key == "best" and b.autocast != "float32" else "no"
                label = (f"transformers + peft ({dtype} weights, {attn} attention, {amp} autocast)"
                         + (": the authors' train_lora.py" if key == "authors" else ""))
            # this shape's share of the time left; ours compiles first: all of it but what the transformers rows are
            # likely to need (at least half)
            left = p.left() / (len(shapes) - n)
            share = left if i == 2 else max(left / 2, left - (2 - i) * REFERENCE_ROW_S)
            r = dict(label=f"{spec}: {label}", **bench.run_config(b, name, timeout=max(1.0, share)))
            if "seconds" in r:
                r.update(tokens_per_s=b.batch_size * b.seq_len / r["seconds"], mfu=flops / r["seconds"] / peak)
            shape_rows[key] = p.rec["rows"][f"{spec} {key}"] = r
            p.put()
        if all("tokens_per_s" in r for r in shape_rows.values()):
            o, a, best = (shape_rows[k] for k in ("ours", "authors", "best"))
            p.rec["speedup"][spec] = {"authors": o["tokens_per_s"] / a["tokens_per_s"],
                                      "best": o["tokens_per_s"] / best["tokens_per_s"]}
            p.put(summary=(p.rec["summary"] + "; " if p.rec["summary"] else "") +
                  f"{spec}: ours {o['tokens_per_s']:,.0f} tokens/s, MFU {o['mfu']:.1%}, {o['peak_gb']:.2f} GB, cold "
                  f"start {o['cold_start_s']:.0f} s; {o['tokens_per_s'] / a['tokens_per_s']:.2f}x the authors' setup "
                  f"({a['peak_gb']:.2f} GB), {o['tokens_per_s'] / best['tokens_per_s']:.2f}x transformers + peft at "
                  f"its best ({best['peak_gb']:.2f} GB)")
    bad = [f"{r['label']}: {r['error']}" for r in p.rec["rows"].values() if "error" in r]
    if bad:
        raise RuntimeError("; ".join(bad))


# ----------------------------------------------------------------------------------------------------------------------
# 4. torchrun


def part_torchrun(p: Part):
    """adapt.py under torchrun with one process: the process group (NCCL on a GPU), then FSDP2 sharding over it. Both
    run the same fp32 steps uncompiled, so their adapters must agree (tests/test_adapt.py does 2 gloo ranks)."""
    model, data, sae = tiny_run_files(p, "gemma2")
    args = ["--model", model, "--data", data, "--sae", sae, "--seq-len", "64", "--batch-size", "4", "--max-tokens",
            "1024", "--eval-tokens", "256", "--eval-interval", "4", "--log-interval", "2", "--ckpt-interval", "4",
            "--lr", "3e-3", "--rank", "8", "--compile", "false", "--autocast", "float32", "--dropout", "0",
            f"--device={p.dev.type}"]
    backend = "nccl" if p.dev.type == "cuda" else "gloo"
    p.put(ran=f"torchrun --nproc_per_node 1 adapt.py ({backend}), then with --fsdp: tiny Gemma-2, 4 steps of 4 x 64 "
              f"tokens, fp32, uncompiled", backend=backend, runs={})
    for name, extra in ((backend, []), ("fsdp", ["--fsdp"])):
        with socket.socket() as s:  # a free port for the rendezvous
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        t0 = time.time()
        sub(p, [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "1", "--master-port", str(port),
                "adapt.py", *args, "--out", os.path.join(p.tmp, name), *extra])
        res = json.load(open(os.path.join(p.tmp, name, "results.json")))
        p.rec["runs"][name] = dict(seconds=time.time() - t0, tokens_per_s=res["tokens_per_s"],
                                   kl_sae_lora=res["kl_sae_lora"], steps=res["steps"])
        p.put()
    a, b = (torch.load(os.path.join(p.tmp, n, "ckpt.pt"), map_location="cpu", weights_only=False)["adapter"]
            for n in (backend, "fsdp"))
    diff = max((x - y).abs().max().item() for x, y in zip(a, b))
    same = all(torch.allclose(x, y, atol=1e-5, rtol=1e-4) for x, y in zip(a, b))
    p.put(adapter_max_abs_diff=diff, adapters_agree=same, summary=f"{backend} and FSDP2 adapters agree to {diff:.1e}; "
          + ", ".join(f"{n} {r['tokens_per_s']:,.0f} tokens/s" for n, r in p.rec["runs"].items()))
    if not same:
        raise AssertionError(f"the FSDP2 adapter differs from the {backend} one by up to {diff:.2e}")


# ----------------------------------------------------------------------------------------------------------------------
# 5. bench.py sae


def part_sae(p: Part):
    args = ["--d-model", "64", "--n-layer", "2", "--vocab", "512", "--layer", "0", "--expansion", "4", "--k", "4",
            "--steps", "1", "--warmup", "1", "--compile-sae", "false"] if p.quick else []
    cmd = ["python", "tools/bench.py", "sae", *args, f"--device={p.dev}"]
    p.put(ran=" ".join(cmd) + ("" if p.quick else " (a 512-wide, 8-layer Gemma-2 shape, 16k vocabulary)"))
    proc = sub(p, [sys.executable, *cmd[1:]])
    res = json.loads(proc["stdout"].strip().splitlines()[-1])
    p.put(results=res, summary=f"ours {res['ours_tokens_per_s']:,.0f} tokens/s against the paper's loop "
                               f"{res['paper_tokens_per_s']:,.0f}: {res['ratio']:.1f}x")


if __name__ == "__main__":
    common.cli(main)
