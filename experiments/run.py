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
<name>.md (the table the README shows) and <name>.png (the figure; needs `pip install matplotlib`); on a real model
into experiments/results/<model's name>/ (harness.results_dir), and never over a file the harness did not write.

On a real model the same commands take the paper's settings: e.g.
    python experiments/run.py frontier --model google/gemma-2-2b --data data/pile --layer 12 --k 64 \
        --sae-tokens 2000000000 --e2e-tokens 2000000000 --lora-tokens 15000000
(Sec. 4.2: the TopK and e2e SAEs both train on 2B tokens, the adaptation on 15M.) --adapt-args="..." gives every
adaptation, and the held-out windows every SAE is scored on, a recipe of its own (SmolLM2's in experiments/README.md).

Every results/<name>.json records how it was made (`provenance`): the command, the commit, the machine and the wall
time, the latter summed over every step it ran or found done (each step writes run.json next to its output with its
own command and wall seconds; a step done before that file existed counts as unrecorded, and the total is then null).
"""
from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import asdict

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import torch  # noqa: E402

from plumbing import common  # noqa: E402
from model import Transformer  # noqa: E402
from sae import SAE  # noqa: E402
from experiments.harness import (  # noqa: E402  (the steps, the results files)
    ExpConfig, _CACHED, _COMMIT, _RAN, _STARTED, _STEPS, adapt_run, commit, embedded_paths,
    held_out_batches, lora_params, main_sae, pyplot, run, save, savefig, tiny, train_topk)
from experiments.derive import derive  # noqa: E402
from experiments.frontier import frontier, interpolate, reaching  # noqa: E402,F401  (tests)


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
        savefig(plt, fig, "rank", cfg)



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
        savefig(plt, fig, "layers", cfg)


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
        savefig(plt, fig, "multi", cfg)


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
    common.cli(main)
