"""The noise floor of the gap closed, and the differences the claims table's statuses rest on, as a results file.

    python experiments/noise.py     # reads experiments/results/, writes experiments/results/noise.json

The rule (experiments/README.md, above the claims table): a status other than "inconclusive" needs a difference
beyond 2 standard errors of the seeds' spread, or a stated test. With n seeds of one setting, s is their sample
standard deviation; a mean of n runs has standard error s / sqrt(n), and the difference of two single runs of two
settings, each with the same spread, has standard error sqrt(2) s: so two single runs are told apart when they differ
by more than 2 sqrt(2) s (`floor_single_runs`). Every value is written with its formula and the files it reads.
"""
from __future__ import annotations

import json
import math
import os
import platform
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(ROOT, "experiments", "results")
SMOL_SEEDS = [f"smollm2/seeds/adapt1m-r64-seed{s}.json" for s in (0, 1, 2)]
GEMMA_SEEDS = ["gemma3_270m/adapt-jr-r64-after.json"] + [f"gemma3_270m/seeds/adapt-jr-r64-after-seed{s}.json"
                                                        for s in (1, 2)]  # seed 0's run, then seeds 1 and 2


def read(rel: str, *keys):
    with open(os.path.join(RESULTS, rel)) as f:
        obj = json.load(f)
    for k in keys:
        obj = obj[k]
    return obj


def sample_sd(values: list[float]) -> float:
    mean = sum(values) / len(values)
    return math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))


def spread(name: str, values: list[float], files: list[str]) -> dict:
    """Mean, sample SD, SE of the mean and the single-run floor of `values` (fractions), in points of gap closed."""
    n = len(values)
    mean = sum(values) / n
    sd = sample_sd(values)
    src = ", ".join(files)
    return {
        f"{name}_n": {"value": n, "formula": f"runs: {src}"},
        f"{name}_mean_points": {"value": 100 * mean, "formula": f"mean gap_closed x 100 of {src}"},
        f"{name}_sd_points": {"value": 100 * sd, "formula": "sample standard deviation (n - 1) x 100"},
        f"{name}_se_points": {"value": 100 * sd / math.sqrt(n), "formula": "sd / sqrt(n), x 100"},
        f"{name}_floor_single_runs_points": {"value": 100 * 2 * math.sqrt(2) * sd,
                                             "formula": "2 sqrt(2) sd x 100: two standard errors of the difference "
                                                        "of two single runs"},
    }


def seeds(name: str, files: list[str]) -> dict:
    """spread() of the seeds' gap closed among `files` that exist (at least 2), and the mean gap left after LoRA."""
    have = [f for f in files if os.path.exists(os.path.join(RESULTS, f))]
    if len(have) < 2:
        return {}
    return {**spread(name, [read(f, "gap_closed") for f in have], have),
            f"{name}_gap_left_nats_mean": {
                "value": sum(read(f, "ce_sae_lora") - read(f, "ce_base") for f in have) / len(have),
                "formula": f"mean of ce_sae_lora - ce_base over {', '.join(have)}"}}


def diff(name: str, a: tuple[str, tuple], b: tuple[str, tuple], scale: float = 100.0, what: str = "gap_closed") -> dict:
    """a - b of two results files' values (file, keys), x scale."""
    va, vb = read(a[0], *a[1]), read(b[0], *b[1])
    return {name: {"value": scale * (va - vb),
                   "formula": f"({a[0]}:{'.'.join(map(str, a[1]))} - {b[0]}:{'.'.join(map(str, b[1]))}) x {scale:g}"
                              f" ({what})"}}


def paired(name: str, a: list[tuple[str, tuple]], base: tuple[str, tuple]) -> dict:
    """Per seed: a_i - base; their mean, and the SE of that mean (s / sqrt(n)); in the values' own units."""
    d = [read(f, *k) - read(base[0], *base[1]) for f, k in a]
    n, mean = len(d), sum(d) / len(d)
    se = sample_sd(d) / math.sqrt(n)
    src = ", ".join(f"{f}:{'.'.join(map(str, k))}" for f, k in a)
    base_src = f"{base[0]}:{'.'.join(map(str, base[1]))}"
    out = {f"{name}_seed{i}": {"value": x, "formula": f"{a[i][0]} - {base_src}"} for i, x in enumerate(d)}
    out[f"{name}_mean"] = {"value": mean, "formula": f"mean over seeds of ({src}) - {base_src}"}
    out[f"{name}_se"] = {"value": se, "formula": "sample sd of the per-seed differences / sqrt(n)"}
    out[f"{name}_in_se"] = {"value": mean / se if se else None, "formula": "mean / se"}
    return out


def nats_recovered(rel: str) -> float:
    return read(rel, "ce_sae") - read(rel, "ce_sae_lora")


def main():
    t0 = time.time()
    v: dict = {}
    smol = "smollm2/"
    # -- the noise floors -------------------------------------------------------------------------------------------
    v.update(seeds("smollm2_test_r64", SMOL_SEEDS))
    v.update(seeds("gemma3_test_jr_r64_after", GEMMA_SEEDS))
    if "gemma3_test_jr_r64_after_n" in v:
        g0 = (GEMMA_SEEDS[0], "validation")
        for a in (2, 3, 4):  # row 34: seed 0's share closed on the validation part, rising with the tokens
            tok = read(g0[0], g0[1], a, "tokens")
            v.update(diff(f"gemma3_row34_rise_to_{tok}_points", (g0[0], (g0[1], a, "gap_closed")),
                          (g0[0], (g0[1], a - 1, "gap_closed"))))
    if os.path.exists(os.path.join(RESULTS, GEMMA_EVAL)):
        v.update(_gemma3_eval())
    tiny = ["default.json", "default-seed1.json"]
    v.update(spread("tiny_default", [read(f, "adapt", "gap_closed") for f in tiny], tiny))
    # -- SmolLM2 rows: differences of single runs (one seed each) ---------------------------------------------------
    r64 = (smol + "rerun-adapt1m-r64.json", ("gap_closed",))
    k32, k128 = (smol + "adapt1m-r64-k32.json", ("gap_closed",)), (smol + "adapt1m-r64-k128.json", ("gap_closed",))
    v.update(diff("row4_k128_minus_k32_points", k128, k32))
    v.update(diff("row4_k64_minus_k32_points", r64, k32))
    v.update(diff("row4_k128_minus_k64_points", k128, r64))
    for k, f in (("k32", "adapt1m-r64-k32.json"), ("k64", "rerun-adapt1m-r64.json"), ("k128", "adapt1m-r64-k128.json")):
        v[f"row4_{k}_nats_recovered"] = {"value": nats_recovered(smol + f),
                                         "formula": f"{smol}{f}: ce_sae - ce_sae_lora (nats)"}
    e4, e16 = (smol + "adapt1m-r64-e4.json", ("gap_closed",)), (smol + "adapt1m-r64-e16.json", ("gap_closed",))
    v.update(diff("row5_width9216_minus_4608_points", e16, r64))
    v.update(diff("row5_width9216_minus_2304_points", e16, e4))
    s8, s22 = (smol + "adapt1m-r64-sae8.json", ("gap_closed",)), (smol + "adapt1m-r64-sae22.json", ("gap_closed",))
    v.update(diff("row6_layer15_minus_layer8_points", r64, s8))
    v.update(diff("row6_layer15_minus_layer22_points", r64, s22))
    v.update(diff("row7_rank64_minus_rank4_points", (smol + "adapt1m-r64.json", ("gap_closed",)),
                  (smol + "adapt1m-r4.json", ("gap_closed",))))
    v.update(diff("row33_layer16_minus_layer22_points", (smol + "adapt1m-r64-L16.json", ("gap_closed",)),
                  (smol + "adapt1m-r64-L22only.json", ("gap_closed",))))
    v.update(diff("row39_one_minus_three_saes_points", r64, (smol + "adapt1m-multi3.json", ("gap_closed",))))
    v["row9_e2e_token_share"] = {"value": read(smol + "e2e-463k.json", "matched_flops", "run_tokens") / 1048576,
                                 "formula": f"{smol}e2e-463k.json: matched_flops.run_tokens / the TopK SAE's 1,048,576"}
    d = read(smol + "derived.json", "rerun")
    v["row27_hellaswag_sae_lora_minus_sae_in_se"] = {
        "value": d["hellaswag_acc_sae_lora_minus_sae_points"]["value"] /
        d["hellaswag_acc_sae_lora_minus_sae_paired_se_points"]["value"],
        "formula": f"{smol}derived.json: rerun.hellaswag_acc_sae_lora_minus_sae_points / its paired_se_points"}
    v["row42_rank4_params"] = {"value": read(smol + "derived.json", "rank4_params_share_of_model") *
                               read(smol + "derived.json", "model_parameters"),
                               "formula": f"{smol}derived.json: rank4_params_share_of_model x model_parameters"}
    for name, f, i in (("row13_e2e_over_adapt_backward", "frontier.json", 4),
                       ("row13_e2e4m_over_adapt_backward", "frontier-e2e4m.json", 5)):
        v[name] = {"value": read(f, "speedups", i, "e2e_backward") / read(f, "speedups", 0, "topk_lora_backward"),
                   "formula": f"{f}: speedups[{i}].e2e_backward (the e2e run's sequences) / speedups[0]."
                              "topk_lora_backward (one adaptation's)"}
    # -- SmolLM2 rows 10 and 34: the e2e comparison's design, and the share closed as the tokens grow ---------------
    fr = smol + "frontier.json"
    v["row10_cap_ratio"] = {"value": read(fr, "e2e", -1, "flops") / read(fr, "topk_sae_flops"),
                            "formula": f"{fr}: e2e[-1].flops / topk_sae_flops: the largest e2e / TopK + LoRA FLOPs "
                                       "ratio possible, since TopK + LoRA starts after the whole TopK SAE's run"}
    v.update(diff("row10_margin_nats", (fr, ("e2e", -1, "ce_sae")), (smol + "adapt1m-r64.json",
                  ("gap_closed_at_eval_points", 1, "ce_sae_lora")), scale=1.0, what="CE, nats"))
    v.update(diff("sae_rerun_ce_spread_nats", (smol + "sae-L15-1m.json", ("held_out", "ce_sae")),
                  (smol + "rerun-sae-L15-1m.json", ("held_out", "ce_sae")), scale=1.0, what="CE with the SAE, nats"))
    pts = (smol + "adapt1m-r64.json", "gap_closed_at_eval_points")
    for a, b in ((2, 1), (3, 2), (4, 3)):
        tok = read(pts[0], pts[1], a, "tokens")
        v.update(diff(f"row34_rise_to_{tok}_points", (pts[0], (pts[1], a, "gap_closed")),
                      (pts[0], (pts[1], b, "gap_closed"))))
    v.update(_long_run(smol + "adapt-r64-1m.json", SMOL_SEEDS[0], "row34_1m"))  # row 34: the headline recipe to 1M
    v.update(_frontier_1m(smol + "frontier-1m.json", SMOL_SEEDS[0]))
    v.update(_k_sweep_after({k: f"{smol}ksweep/adapt-k{k}-after.json" for k in (32, 64, 128)}, SMOL_SEEDS,
                            "row4_after", "smollm2_test_r64"))
    # -- Gemma-3 rows 4 and 34: the JumpReLU L0 sweep after the SAE, and the headline adaptation to 1M tokens -------
    gemma = "gemma3_270m/"
    v.update(_k_sweep_after({32: gemma + "l0sweep/adapt-k32-after.json", 64: GEMMA_SEEDS[0],
                             128: gemma + "l0sweep/adapt-k128-after.json"}, GEMMA_SEEDS, "gemma3_row4_after",
                            "gemma3_test_jr_r64_after"))
    v.update(_long_run(gemma + "adapt-jr-r64-after-1m.json", GEMMA_SEEDS[0], "gemma3_row34_1m"))
    if os.path.exists(os.path.join(RESULTS, gemma + "adapt-jr-r4-after.json")):  # row 7: rank 64 over rank 4, seed 0
        v.update(diff("gemma3_row7_rank64_minus_rank4_points", (GEMMA_SEEDS[0], ("gap_closed",)),
                      (gemma + "adapt-jr-r4-after.json", ("gap_closed",))))
    v.update(_sae_last_quarter(gemma, {32: "l0sweep/sae-jr-L9-k32.json", 64: "sae-jr-L9.json",
                                       128: "l0sweep/sae-jr-L9-k128.json"}, "gemma3_row4_sae"))
    # -- tiny rows 18-20: SAEBench, the adapted model per seed against the base model (both seeds' base: the same) --
    v.update(_saebench(tiny))
    wall = time.time() - t0
    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    out = {"values": v, "command": "python experiments/noise.py", "commit": commit or None,
           "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores; reads files only",
           "date": time.strftime("%Y-%m-%d"), "wall_seconds": wall}
    with open(os.path.join(RESULTS, "noise.json.tmp"), "w") as f:
        json.dump(out, f, indent=1)
    os.replace(os.path.join(RESULTS, "noise.json.tmp"), os.path.join(RESULTS, "noise.json"))
    print(f"wrote experiments/results/noise.json: {len(v)} values", file=sys.stderr)


def _k_sweep_after(files: dict, seed_files: list[str], prefix: str, floor: str) -> dict:
    """Row 4 (the paper's protocol): SAEs with k 32, 64, 128 (files: {k: results file}) adapted on the layers after
    them; the differences of single runs in points and the nats recovered, beside the seeds' floor in nats
    (seed_files: the seeds of the model's headline setting; `floor` names it)."""
    files = {k: f for k, f in files.items() if os.path.exists(os.path.join(RESULTS, f))}
    out = {}
    for k, f in files.items():
        out[f"{prefix}_k{k}_nats_recovered"] = {"value": nats_recovered(f), "formula": f"{f}: ce_sae - ce_sae_lora"}
    for a, b in ((64, 32), (128, 64), (128, 32)):
        if a in files and b in files:
            out.update(diff(f"{prefix}_k{a}_minus_k{b}_points", (files[a], ("gap_closed",)),
                            (files[b], ("gap_closed",))))
            out[f"{prefix}_k{b}_minus_k{a}_nats_recovered"] = {
                "value": nats_recovered(files[b]) - nats_recovered(files[a]),
                "formula": f"nats recovered of {files[b]} - of {files[a]}"}
    nats = [nats_recovered(f) for f in seed_files if os.path.exists(os.path.join(RESULTS, f))]
    if len(files) > 1 and len(nats) > 1:
        out[f"{floor}_nats_recovered_floor_single_runs"] = {
            "value": 2 * math.sqrt(2) * sample_sd(nats),
            "formula": f"2 sqrt(2) x the sample sd of ce_sae - ce_sae_lora over {seed_files}"}
    return out


def _sae_last_quarter(folder: str, files: dict, prefix: str) -> dict:
    """Row 4: how far each SAE's CE with it (its held-out curve, four points a run) fell over its last quarter of
    training, and the smallest and largest of those drops: whether the sweep's SAEs had converged."""
    out, drops = {}, {}
    for k, f in files.items():
        f = folder + f
        if os.path.exists(os.path.join(RESULTS, f)):
            name = f"{prefix}_k{k}_last_quarter_ce_drop_nats"
            out.update(diff(name, (f, ("held_out_curve", -2, "ce_sae")), (f, ("held_out_curve", -1, "ce_sae")),
                            scale=1.0, what="CE with the SAE, nats"))
            drops[k] = out[name]["value"]
    if len(drops) > 1:
        for name, fn in (("min", min), ("max", max)):
            out[f"{prefix}_last_quarter_ce_drop_{name}_nats"] = {
                "value": fn(drops.values()), "formula": f"{name} of {prefix}_k*_last_quarter_ce_drop_nats"}
    return out


def _long_run(long: str, short: str, prefix: str) -> dict:
    """Row 34 (issue 45 item 3): a headline recipe run for 1M tokens against the same seed's 131k-token run (the test
    part), and the rise of its share closed on the validation part over each of its last two 131k-token stretches
    and over its last 262k tokens."""
    if not os.path.exists(os.path.join(RESULTS, long)):
        return {}
    out = diff(f"{prefix}_minus_131k_points", (long, ("gap_closed",)), (short, ("gap_closed",)))
    val = read(long, "validation")
    at = {p["tokens"]: i for i, p in enumerate(val)}
    end = val[-1]["tokens"]
    for back in (0, 131072):
        a, b = end - back, end - back - 131072
        if a in at and b in at:
            out.update(diff(f"{prefix}_validation_rise_to_{a}_points", (long, ("validation", at[a], "gap_closed")),
                            (long, ("validation", at[b], "gap_closed"))))
    if end - 262144 in at:
        out.update(diff(f"{prefix}_validation_last_262k_points", (long, ("validation", at[end], "gap_closed")),
                        (long, ("validation", at[end - 262144], "gap_closed"))))
    return out


def _frontier_1m(fr: str, headline: str) -> dict:
    """Rows 9, 10, 12, 14, 35 (SmolLM2, the paper's protocol): the headline adaptation (131k tokens from the final TopK SAE)
    placed on the frontier's FLOPs axis, and the e2e SAE's FLOPs to reach its CE, bracketed by the e2e checkpoints
    before and at the first that reaches it (the e2e SAE is scored every 10% of its run)."""
    if not os.path.exists(os.path.join(RESULTS, fr)):
        return {}
    last, e2e = read(fr, "points", "topk_lora", -1), read(fr, "points", "e2e")
    per_token = last["lora_flops"] / read(fr, "config", "lora_tokens")
    flops = last["sae_flops"] + read(headline, "train_tokens") * per_token
    ce = read(headline, "ce_sae_lora")
    i = next(i for i, q in enumerate(e2e) if q["ce"] <= ce)
    src = f"{fr}: points.topk_lora[-1]"
    long = "smollm2/adapt-r64-1m.json"  # the headline recipe for 1M tokens
    rows = [r for r in read(fr, "speedups_flops") if r["topk"] is not None and r["topk_lora"] is not None]
    ratios = [r["topk_lora"] / r["topk"] for r in rows]
    ratio_formula = f"{fr}: speedups_flops[i].topk_lora / .topk over the CEs both reach"
    return {"row10_1m_headline_flops": {"value": flops, "formula": f"{src}.sae_flops + {headline}:train_tokens x "
                                        f"{src}.lora_flops / config.lora_tokens (the same adaptation step)"},
            "row10_1m_e2e_flops_at_headline_ce": {"value": e2e[i]["flops"], "formula": f"{fr}: points.e2e[i].flops, "
                                                  f"the first e2e checkpoint with ce <= {headline}:ce_sae_lora"},
            "row10_1m_e2e_pct_at_headline_ce": {"value": e2e[i]["pct"], "formula": "that checkpoint's pct"},
            "row10_1m_speedup_upper": {"value": e2e[i]["flops"] / flops, "formula": "e2e flops at that checkpoint "
                                       "/ row10_1m_headline_flops"},
            "row10_1m_speedup_lower": {"value": e2e[i - 1]["flops"] / flops, "formula": "e2e flops at the checkpoint "
                                       "before it (not yet reaching the CE) / row10_1m_headline_flops"},
            "row14_1m_e2e_minus_headline_nats": {"value": e2e[-1]["ce"] - ce,
                                                 "formula": f"{fr}: points.e2e[-1].ce - {headline}:ce_sae_lora"},
            "row14_1m_e2e_minus_long_nats": {"value": e2e[-1]["ce"] - read(long, "ce_sae_lora"),
                                             "formula": f"{fr}: points.e2e[-1].ce - {long}:ce_sae_lora"},
            "row14_1m_long_flops_over_e2e": {"value": (last["sae_flops"] + read(long, "train_tokens") * per_token)
                                             / e2e[-1]["flops"], "formula": f"({src}.sae_flops + {long}:train_tokens "
                                             "x the adaptation's FLOPs per token) / points.e2e[-1].flops"},
            "row9_1m_topk_lora_minus_e2e_nats": {"value": last["ce"] - e2e[-1]["ce"],
                                                 "formula": f"{src}.ce - points.e2e[-1].ce"},
            "row12_1m_topk_lora_over_topk_flops_min": {"value": min(ratios), "formula": ratio_formula},
            "row12_1m_topk_lora_over_topk_flops_max": {"value": max(ratios), "formula": ratio_formula},
            "row13_1m_e2e_over_adapt_backward": {"value": e2e[-1]["backward"] / last["backward"],
                                                 "formula": f"{fr}: points.e2e[-1].backward / {src}.backward"},
            "row35_1m_e2e_last_tenth_nats": {"value": e2e[-2]["ce"] - e2e[-1]["ce"],
                                             "formula": f"{fr}: points.e2e[-2].ce - points.e2e[-1].ce"}}


GEMMA_EVAL = "gemma3_270m/eval-r64-after.json"  # eval.py on seed 0's adapter (rank 64 after the SAE)


def _gemma3_eval() -> dict:
    """Gemma-3 rows 29-31, 38 and 40 from eval.py's groups[0] of GEMMA_EVAL: the per-token shares (the 0.01-1 nats
    bins of its histograms, as experiments/derive.py counts them for the tiny model), the adapted model without the
    SAE against the original, and the layers after the SAE whose distance changed beyond its 90% interval."""
    g, f, out = read(GEMMA_EVAL, "eval", "groups", 0), GEMMA_EVAL, {}
    pt, edges = g["per_token"], g["per_token"]["bin_edges"]
    inside = [i for i in range(len(edges) - 1) if edges[i] >= 1e-2 * (1 - 1e-9) and edges[i + 1] <= 1 + 1e-9]
    for kind in ("improved", "degraded"):
        out[f"gemma3_nats_{kind}_share_0.01_to_1"] = {
            "value": sum(pt[f"nats_{kind}_per_bin"][i] for i in inside) / sum(pt[f"nats_{kind}_per_bin"]),
            "formula": f"{f}: eval.groups[0].per_token: nats {kind} by tokens changed by 0.01 to 1 nats / all"}
    hist = [a + b for a, b in zip(pt["hist_improved"], pt["hist_degraded"])]
    out["gemma3_tokens_changed_share_0.01_to_1"] = {
        "value": sum(hist[i] for i in inside) / sum(hist),
        "formula": f"{f}: eval.groups[0].per_token: tokens changed by 0.01 to 1 nats (either way) / all changed"}
    above = [i for i in range(len(edges) - 1) if edges[i] >= 1 - 1e-9]
    out["gemma3_tokens_changed_share_above_1"] = {
        "value": sum(hist[i] for i in above) / sum(hist),
        "formula": f"{f}: eval.groups[0].per_token: tokens changed by more than 1 nat (either way) / all changed"}
    out["gemma3_nats_improved_share_above_1"] = {
        "value": sum(pt["nats_improved_per_bin"][i] for i in above) / sum(pt["nats_improved_per_bin"]),
        "formula": f"{f}: eval.groups[0].per_token: nats improved by tokens improved by more than 1 nat / all"}
    out["gemma3_sae_gap_nats"] = {"value": g["gap"], "formula": f"{f}: eval.groups[0].gap: CE with the SAE - "
                                                                "CE original (nats), on eval.py's test tokens"}
    s = g["settings"]
    out["gemma3_lora_minus_original_ce"] = {"value": s["lora"]["ce"] - s["original"]["ce"],
                                            "formula": f"{f}: settings.lora.ce - settings.original.ce (nats)"}
    after = [x for x in g["distances"]["layers"] if x["after_sae"] > 0]
    for what, better in (("cos", lambda c: c["lo"] > 0), ("l2", lambda c: c["hi"] < 0)):
        out[f"gemma3_layers_closer_by_{what}"] = {
            "value": sum(better(x[f"{what}_change"]) for x in after),
            "formula": f"{f}: distances (ours): layers after the SAE whose {what}_change 90% interval lies on the "
                       f"closer side ({'above' if what == 'cos' else 'below'} 0), of {len(after)}"}
    return out


THRESHOLDS = (2, 5, 10, 20, 50, 100, 500)  # SAEBench's SCR and TPP thresholds
SAEBENCH = {  # name: (task, the keys averaged)
    "scr_mean": ("scr", [f"scr_metric_threshold_{t}" for t in THRESHOLDS]),
    "tpp_mean": ("tpp", [f"tpp_threshold_{t}_total_metric" for t in THRESHOLDS]),
    **{f"sparse_probing_top{k}": ("sparse_probing", [f"sae_top_{k}_test_accuracy"]) for k in (1, 2, 5, 10, 20, 50)},
    "sparse_probing_test": ("sparse_probing", ["sae_test_accuracy"]),
}


def _saebench(files: list[str]) -> dict:
    """Rows 18-20 on the tiny model: per seed, the adapted model's SAEBench number minus the base model's; the mean
    over seeds and its standard error (eval.saebench.settings.{adapted,base} of each file)."""
    out = {}
    for name, (task, keys) in SAEBENCH.items():
        def metric(f, setting):
            d = read(f, "eval", "saebench", "settings", setting, task)
            return sum(d[k] for k in keys) / len(keys)
        per = [metric(f, "adapted") - metric(f, "base") for f in files]
        n, mean = len(per), sum(per) / len(per)
        se = math.sqrt(sum((x - mean) ** 2 for x in per) / (n - 1)) / math.sqrt(n)
        what = f"mean of {task}.{{{', '.join(keys)}}}" if len(keys) > 1 else f"{task}.{keys[0]}"
        for f, x in zip(files, per):
            out[f"tiny_saebench_{name}_{f[:-5]}_adapted"] = {
                "value": metric(f, "adapted"), "formula": f"{f}: eval.saebench.settings.adapted: {what}"}
        out[f"tiny_saebench_{name}_base"] = {"value": metric(files[0], "base"),
                                             "formula": f"{files[0]}: eval.saebench.settings.base: {what}"}
        out[f"tiny_saebench_{name}_diff_mean"] = {"value": mean, "formula": "mean over seeds of adapted - base"}
        out[f"tiny_saebench_{name}_diff_se"] = {"value": se, "formula": "sample sd of the per-seed differences / "
                                                                         "sqrt(n seeds)"}
        out[f"tiny_saebench_{name}_diff_in_se"] = {"value": mean / se if se else None, "formula": "mean / se"}
    return out


if __name__ == "__main__":
    main()
