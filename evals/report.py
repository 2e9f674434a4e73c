"""eval.py's report: eval.md (the tables of every section eval.py ran) and its figures, from eval.json's content."""
from __future__ import annotations

import os

import numpy as np

from evals import confidence, generate, multiple_choice, steering
from formats import disk

NAMES = {"original": "Original", "sae": "SAE", "sae_lora": "SAE + LoRA", "lora": "LoRA"}  # the settings of Sec. 5.3


def markdown(res: dict) -> str:
    L = [f"# Evaluation of `{res['model']}`", "",
         "SAEs: " + ", ".join(f"`{s['path']}` (layer {s['layer']}, {s.get('site', 'resid')}, {s['arch']}, "
                              f"{s['d_sae']} latents)"
                              for s in res["saes"]), ""]
    groups = res["groups"]
    if any("settings" in g for g in groups):
        n_sae = len(res["saes"])
        L += [f"## Held-out CE and KL to the original model ({groups[0]['positions']:,} predicted positions; nats"
              f" per position"
              f"{'; SAE rows are compound: all ' + str(n_sae) + ' SAEs spliced' if n_sae > 1 else ''})", "",
              "| adapter | setting | CE | KL | gap closed |", "| --- | --- | --- | --- | --- |"]
        for g in groups:
            for s, v in g["settings"].items():
                gc = confidence.fmt_num(g.get("gap_closed"), ".1%") if s == "sae_lora" else ""
                L.append(f"| {g['name']} | {NAMES[s]} | {v['ce']:.4f} | {v['kl']:.4f} | {gc} |")
        L += ["", "## SAE at its layer (original model's activations; LoRA model's in the last columns)", "",
              "| adapter | layer | site | arch | FVU | L0 | dead latents | FVU (LoRA) | L0 (LoRA) |",
              "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
        for g in groups:
            for s in g["sae_stats"]:
                L.append(f"| {g['name']} | {s['layer']} | {s.get('site', 'resid')} | {s['arch']} | {confidence.fmt_num(s['fvu'], '.4f')} | {s['l0']:.1f} | "
                         f"{s['dead']} ({s['dead_frac']:.1%}) | {confidence.fmt_num(s.get('fvu_lora'), '.4f')} | "
                         f"{confidence.fmt_num(s.get('l0_lora'), '.1f')} |")
    if any("per_token" in g for g in groups):
        L += ["", "## Per-token change CE(SAE + LoRA) - CE(SAE)", "",
              "| adapter | positions | improved | degraded | unchanged | mean change | nats gained | nats lost |",
              "| --- | --- | --- | --- | --- | --- | --- | --- |"]
        for g in groups:
            if "per_token" in g:
                p = g["per_token"]
                L.append(f"| {g['name']} | {p['positions']:,} | {p['share_improved']:.1%} | {p['share_degraded']:.1%} | "
                         f"{p['share_unchanged']:.1%} | {p['mean_change']:+.4f} | {p['nats_improved']:.1f} | "
                         f"{p['nats_degraded']:.1f} |")
    if any("distances" in g for g in groups):
        L += ["", "## Distance to the original model's activations (90% CI over sequences; change = LoRA - base, "
              "paired by sequence)", ""] + list(dict.fromkeys(  # each formulation's definition, as eval.json records it
            f"- {d['formulation']}: {d['how']}" for g in groups for k in ("distances", "distances_authors")
            if (d := g.get(k))))
        L += ["", "| adapter | averaged | layer (after SAE) | cos SAE | cos SAE + LoRA | cos change | L2 SAE | "
              "L2 SAE + LoRA | L2 change |", "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
        for g in groups:
            for f in ("ours", "authors"):  # eval.DISTANCES
                for r in g.get("distances" if f == "ours" else f"distances_{f}", {}).get("layers", []):
                    L.append(f"| {g['name']} | {f} | {r['layer']} (+{r['after_sae']}) | "
                             f"{confidence.fmt_ci(r['cos_sae'])} | {confidence.fmt_ci(r.get('cos_sae_lora'))} | "
                             f"{confidence.fmt_ci(r.get('cos_change'))} | "
                             f"{confidence.fmt_ci(r['l2_sae'], 3)} | {confidence.fmt_ci(r.get('l2_sae_lora'), 3)} | "
                             f"{confidence.fmt_ci(r.get('l2_change'), 3)} |")
    if "steering" in res:
        L += steering.markdown(res)
    if "benchmarks" in res:
        L += multiple_choice.markdown(res)
    if "generations" in res:
        L += generate.markdown(res)
    return "\n".join(L) + "\n"


def plots(res: dict, out: str) -> list[str]:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("plots skipped: matplotlib is not installed (pip install matplotlib); every number is in eval.json")
        return []
    written = []

    def save(fig, name):
        path = os.path.join(out, name)
        with disk.atomic_path(path) as tmp:
            fig.savefig(tmp, dpi=150, bbox_inches="tight")
        plt.close(fig)
        written.append(path)
    for i, g in enumerate(res["groups"]):
        if "per_token" in g:  # Fig. 8
            p, fig = g["per_token"], plt.figure(figsize=(5, 3))
            edges = np.array(p["bin_edges"])
            plt.stairs(p["hist_improved"], edges, label="loss improvement", color="green")
            plt.stairs(p["hist_degraded"], edges, label="loss degradation", color="red")
            plt.xscale("log"), plt.yscale("log"), plt.legend()
            plt.xlabel("|CE(SAE) - CE(SAE + LoRA)| (nats)"), plt.ylabel("tokens"), plt.title(g["name"])
            save(fig, f"per_token_{i}.png")
        if "distances" in g:  # Fig. 11, absolute values for both models
            rows = g["distances"]["layers"]
            x = [r["after_sae"] for r in rows]
            fig, axes = plt.subplots(1, 2, figsize=(9, 3))
            for ax, name, label in ((axes[0], "cos", "cosine similarity"), (axes[1], "l2", "L2 distance")):
                for s, color in (("sae", "blue"), ("sae_lora", "green")):
                    if f"{name}_{s}" in rows[0]:
                        c = [r[f"{name}_{s}"] for r in rows]  # no CI from a single sequence: no error bar
                        err = [[d["mean"] - (d["lo"] if d["lo"] is not None else d["mean"]) for d in c],
                               [(d["hi"] if d["hi"] is not None else d["mean"]) - d["mean"] for d in c]]
                        ax.errorbar(x, [d["mean"] for d in c], yerr=err, label=NAMES[s], color=color, marker="o",
                                    ms=3, capsize=2)
                ax.set_xlabel("layers after the SAE"), ax.set_ylabel(label), ax.set_xticks(x), ax.legend()
            fig.suptitle(f"{g['name']}: distance to the original model (90% CI)")
            save(fig, f"distances_{i}.png")
        if "steering" in g:  # Fig. 7 / 10
            save(steering.plot(plt, res, g), f"steering_{i}.png")
    return written
