"""
What every experiment of experiments/run.py shares: its config, the steps (a plain call of a project script, skipped
when its output exists, its wall time recorded in run.json beside it), the held-out CE of SAEs, and the results files
with their provenance (command, commit, machine, wall time) and figures.
"""
from __future__ import annotations

import json
import os
import platform
import re
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import torch  # noqa: E402

from config.adapt import AdaptConfig  # noqa: E402  (the settings adapt.py evaluates with)
from plumbing import common  # noqa: E402
import config  # noqa: E402  (the tiny model's presets)
from formats import disk  # noqa: E402
from plumbing import embedded  # noqa: E402
import splice  # noqa: E402
from evals.held_out import evaluate  # noqa: E402
from formats.checkpoint import resolve_model_dir  # noqa: E402
from model import ModelConfig, Transformer  # noqa: E402
from formats.sae_files import load_saes  # noqa: E402

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
    adapt_args: str = ""  # more adapt.py flags for every adaptation and for the held-out windows SAEs are scored on
    # (a real model's recipe: --adapt-args="--batch-size 4 --seq-len 256 --lr 5e-4", with "=" as its value starts
    # with --); none: adapt.py's defaults (the tiny model: its preset)
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
    # a step without done_file is unfinished: continued (--resume), or, for eval.py, replaced (its partial report)
    again = ["--resume"] if resume else ["--overwrite"] if script == "eval.py" and os.path.isdir(out) else []
    cmd = [script, *base_args(cfg), *args, "--out", out, *again]
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
    run(cfg, "adapt.py", out, [*tokens, *args, *shlex.split(cfg.adapt_args)], "results.json")
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


def held_out_batches(cfg: ExpConfig, device) -> tuple[AdaptConfig, list[torch.Tensor]]:
    """adapt.py's settings for this model (its preset, then --adapt-args) and exactly the held-out batches it
    evaluates on: the same windows, counted and capped as adapt.py counts them."""
    from data import TokenLoader, eval_batches_for, held_out_batches as first_batches
    a, typed = common.parse_args(AdaptConfig, shlex.split(cfg.adapt_args))
    common.set_untyped(a, typed, config.preset("adapt") if tiny(cfg) else {})
    micro = a.micro_batch or a.batch_size
    val = TokenLoader(embedded_paths(cfg)[1], a.eval_split, micro, a.seq_len, 0, 1, shuffle=False, device=device)
    return a, first_batches(val, eval_batches_for(a.eval_tokens, micro, a.seq_len), "--adapt-args' --eval-tokens",
                            "--adapt-args' --seq-len")


@torch.no_grad()
def held_out(cfg: ExpConfig, sae_dirs: list[str], layers: list[int] | None = None) -> dict:
    """CE of the original model and with the SAE(s) spliced, on exactly the held-out tokens adapt.py evaluates on."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = Transformer.from_pretrained(embedded_paths(cfg)[0], device=device).requires_grad_(False)
    saes = load_saes(sae_dirs, layers or None, model, device)
    a, batches = held_out_batches(cfg, device)
    res = evaluate(model, saes, batches, splice.unspliced_tokens(saes, model.cfg, a.sae_positions), chunk=a.kl_chunk,
                   autocast_ctx=common.autocast(device, a.autocast))
    return dict(ce_base=res["ce_base"], ce_sae=res["ce_sae"], kl_sae=res["kl_sae"])


def results_dir(model: str | None) -> str:
    """Where an experiment's results go: experiments/results for the tiny model, experiments/results/<model's name>
    for a real one (smollm2, gemma3_270m, gemma_2_2b), so that a real model's run never replaces the tiny record."""
    if model is None:
        return RESULTS
    name = os.path.basename(model.rstrip("/")).lower()
    return os.path.join(RESULTS, re.sub(r"[^a-z0-9]+", "_", name.removesuffix(".gguf")).strip("_"))


def save(name: str, results: dict, table: str):
    """Results file (with its provenance) and table; a file of that name that this harness did not write (no
    provenance) is left alone: one line says so."""
    folder = results_dir(results.get("config", {}).get("model"))
    path = os.path.join(folder, name + ".json")
    if os.path.isfile(path) and "provenance" not in json.load(open(path)):
        raise ValueError(f"{path} was not written by experiments/run.py (it has no provenance): move it away "
                         f"to write {name}'s results there")
    os.makedirs(folder, exist_ok=True)
    results.pop("wall_seconds", None)  # the invocation's time alone: 0.1 s when every step was done already
    results["provenance"] = provenance()
    results["wall_seconds"] = results["provenance"]["wall_seconds"]
    disk.write_json(path, results, indent=2)
    disk.write_text(os.path.join(folder, name + ".md"), table + "\n")
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


def savefig(plt, fig, name: str, cfg: ExpConfig):
    """The figure beside its results file (results_dir)."""
    fig.savefig(os.path.join(results_dir(cfg.model), name + ".png"), dpi=130, bbox_inches="tight")
    plt.close(fig)


def lora_params(cfg: ExpConfig, r: int, layers: list[int]) -> int:
    return r * sum(i + o for i, o in embedded_paths(cfg)[3].block_linears().values()) * len(layers)


def cfg_seq(results: dict) -> int:
    """Sequence length of a frontier run's adaptations (backward passes count sequences of it)."""
    return 256 if results["config"].get("model") is None else 1024
