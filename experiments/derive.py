"""
`python experiments/run.py derive`: the ratios, differences and standard errors the claims table quotes, each with
its formula, from the other results files (experiments/results/derived.json).
"""
from __future__ import annotations

import glob
import json
import math
import os
import sys
from dataclasses import asdict

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import torch  # noqa: E402

from model import Transformer  # noqa: E402
from experiments.harness import (  # noqa: E402  (the steps, the results files)
    ExpConfig, RESULTS, cfg_seq, embedded_paths, lora_params, save)


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
