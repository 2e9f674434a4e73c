"""Propose a source (results file and key) for every number of the claims table and README's Results that has none.

    python experiments/bind.py            # appends proposals to experiments/sources.tsv for cells not bound yet
                                          # (delete a changed cell's lines first to have it proposed again)

tests/test_claims.py reads experiments/sources.tsv: each reported number, in the order the cell shows them, with the
results file and key it is read from; a number that differs from its key's value (as shown, rounded to its last digit,
as a percentage or not) or a cell whose numbers differ from the table's list fails the suite. This script only
proposes: it takes the first key whose value fits, among the files the row cites (by name), then the column's folder
(the SmolLM2 column: experiments/results/smollm2/, the others: experiments/results/), shallow keys first. A proposal can
be a coincidence: read each against the run it claims before committing. A number with no fitting key is written with
the source "?" and fails the suite until it is given one (add the derivation to a derived.json with its formula) or
removed from the text.
"""
from __future__ import annotations

import glob
import json
import os
import re
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tests"))
import test_claims as tc  # noqa: E402  (the parser of the cells: one definition of what a reported number is)
from noise import GEMMA_SEEDS  # noqa: E402  (experiments/noise.py: the runs of Gemma-3's noise floor)


def leaves(obj, path=""):
    if isinstance(obj, bool):
        return
    if isinstance(obj, (int, float)):
        yield path, float(obj)
    elif isinstance(obj, dict):
        for k, v in obj.items():
            yield from leaves(v, f"{path}.{k}" if path else str(k))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            yield from leaves(v, f"{path}.{i}" if path else str(i))


def load_all():
    out = {}
    for path in sorted(glob.glob(os.path.join(tc.RESULTS, "**", "*.json"), recursive=True)):
        rel = os.path.relpath(path, tc.RESULTS)
        with open(path) as f:
            out[rel] = list(leaves(json.load(f)))
    return out


S = "smollm2/"
# Where each row's runs are, by column: searched first, in this order (the row's own files before shared ones)
HINTS = {
    "ours": {2: ["jumprelu.json", "default.json", "default-seed1.json"], 3: ["derived.json"], 7: ["rank.json"],
             **{r: ["frontier.json", "frontier-e2e4m.json", "derived.json"] for r in (9, 10, 12, 13, 14, 35, 36)},
             15: ["multi.json"], 16: ["multi.json", "derived.json"],
             **{r: ["noise.json", "derived.json", "default.json", "default-seed1.json"] for r in (18, 19, 20, 22)},
             **{r: ["checks.json", "derived.json"] for r in (23, 24, 25, 27, 28, 38)},
             **{r: ["default.json", "default-seed1.json", "derived.json"] for r in (29, 30, 31, 40)},
             32: ["derived.json", "layers.json", "jumprelu.json"], 33: ["layers.json", "derived.json"],
             39: ["derived.json", "multi.json"], 41: ["multi.json"], 42: ["derived.json", "rank.json"],
             1: ["jumprelu.json"]},
    "SmolLM2": {2: [S + "seeds/adapt1m-r64-seed0.json", S + "seeds/adapt1m-r64-seed1.json",
                    S + "seeds/adapt1m-r64-seed2.json", S + "adapt1m-r64.json", S + "rerun-adapt1m-r64.json",
                    S + "adapt1m-r64-after.json"],
                3: [S + "derived.json"],
                4: [S + "derived.json", S + "adapt1m-r64-k32.json", S + "rerun-adapt1m-r64.json",
                    S + "adapt1m-r64-k128.json"],
                5: [S + "derived.json", S + "adapt1m-r64-e4.json", S + "adapt1m-r64-e16.json"],
                6: [S + "derived.json", S + "adapt1m-r64-sae8.json", S + "adapt1m-r64-sae22.json"],
                7: [S + "adapt1m-r4.json"],
                9: [S + "e2e-463k.json", S + "frontier.json", S + "eval-e2e-463k.json", S + "rerun-adapt1m-r64.json"],
                10: [S + "derived.json", S + "frontier.json", S + "eval-e2e-463k.json"],
                12: [S + "rerun-adapt1m-r64.json", S + "frontier.json"],
                13: [S + "e2e-463k.json", S + "derived.json", S + "rerun-adapt1m-r64.json"],
                14: [S + "e2e-463k.json", S + "eval-e2e-463k.json", S + "rerun-adapt1m-r64.json"],
                15: [S + "adapt1m-multi3.json"], 16: [S + "derived.json", S + "rerun-adapt1m-r64.json"],
                17: [S + "adapt1m-multi5.json", S + "derived.json", S + "eval-5sae.json"],
                **{r: [S + "derived.json", S + "saebench-r64.json"] for r in (18, 19, 20, 22)},
                **{r: [S + "rerun-eval-r64-checks.json", S + "rerun-checks-inputs.json", S + "derived.json"]
                   for r in (23, 24, 25, 27)},
                28: [S + "derived.json", S + "eval-tqa-r64.json"],
                **{r: [S + "derived.json", S + "rerun-eval-r64-ce.json"] for r in (29, 30, 31, 40)},
                32: [S + "adapt1m-r64-L16.json", S + "derived.json", S + "adapt1m-r64-Lafter.json"],
                33: [S + "adapt1m-r64-L22only.json"], 34: [S + "adapt1m-r64.json"],
                **{r: [S + "derived.json", S + "frontier.json", S + "e2e-463k.json"] for r in (35, 36)},
                38: [S + "derived.json", S + "rerun-eval-r64-ce.json", S + "rerun-eval-r64-checks.json",
                     S + "eval-tqa-r64.json"],
                39: [S + "derived.json", S + "adapt-r64.json"],
                41: [S + "derived.json", S + "adapt1m-multi5.json", S + "eval-5sae.json"],
                42: [S + "derived.json", S + "adapt1m-r4.json"]},
}
G = "gemma3_270m/"
HINTS["Gemma-3"] = {1: [G + "eval-r64-after.json"], 2: GEMMA_SEEDS + [G + "sae-jr-L9.json"],
                    3: ["noise.json"], 7: [G + "adapt-jr-r16-after.json"] + GEMMA_SEEDS,
                    **{r: ["noise.json", G + "eval-r64-after.json"] for r in (29, 30, 31, 38, 40)},
                    34: [G + "adapt-jr-r64-after.json"]}
HINTS["results"] = {1: ["default.json", "default-seed1.json"],
                    2: [S + "adapt1m-r64.json", S + "rerun-adapt1m-r64.json"], 3: GEMMA_SEEDS}
NOISY = ("history", "per_letter", "bin_edges", "hist_", "provenance", "lora_layers", "sae_layers", "nats_", "curve",
         "distances_authors")  # keys that hold many values: a match there is likely a coincidence


# Proposals read against their runs and corrected by hand: (cell, number, its occurrence in the cell or 0 for all)
N, D, SD = "noise.json:values.", "derived.json:values.", "smollm2/derived.json:rerun."
SB = "smollm2/saebench-r64.json:eval.saebench.settings."
TQ = "smollm2/eval-tqa-r64.json:eval."
OVERRIDES = {
    ("claims 4 SmolLM2-135M", "2.6", 1): N + "row4_k64_minus_k32_points.value",
    ("claims 5 SmolLM2-135M", "2.6", 1): N + "row5_width9216_minus_4608_points.value",
    ("claims 5 SmolLM2-135M", "2.5", 1): N + "row5_width9216_minus_2304_points.value",
    ("claims 6 SmolLM2-135M", "1.5", 1): N + "row6_layer15_minus_layer8_points.value",
    ("claims 6 SmolLM2-135M", "3.5", 1): N + "row6_layer15_minus_layer22_points.value",
    ("claims 9 SmolLM2-135M", "44%", 1): N + "row9_e2e_token_share.value",
    ("claims 14 SmolLM2-135M", "44%", 1): N + "row9_e2e_token_share.value",
    ("claims 10 SmolLM2-135M", "0.90x", 1): SD + "frontier_e2e_over_topk_lora_flops_at_e2e_ckpt_060.value",
    ("claims 16 ours", "0.23", 1): D + "multi3_after_lora_above_one_sae_nats.value",
    ("claims 18 ours", "0.472", 2): D + "default-seed1_scr_max_lora.value",
    ("claims 18 ours", "0.472", 3): D + "default-seed1_scr_max_base.value",
    ("claims 19 SmolLM2-135M", "0.358", 1): SB + "adapted.tpp.tpp_threshold_500_total_metric",
    ("claims 19 SmolLM2-135M", "0.360", 1): SB + "base.tpp.tpp_threshold_500_total_metric",
    ("claims 20 status", "2.3", 1): N + "tiny_saebench_sparse_probing_top2_diff_in_se.value",
    ("claims 20 status", "0.8", 1): N + "tiny_saebench_sparse_probing_top1_diff_in_se.value",
    ("claims 20 status", "1.3", 1): N + "tiny_saebench_sparse_probing_test_diff_in_se.value",
    ("claims 20 SmolLM2-135M", "0.960", 1): SB + "base.sparse_probing.sae_test_accuracy",
    ("claims 22 SmolLM2-135M", "0.642", 1): SB + "adapted.absorption.mean_absorption_fraction",
    ("claims 22 SmolLM2-135M", "0.598", 1): SB + "base.absorption.mean_absorption_fraction",
    ("claims 27 status", "-0.25", 1): D + "multiple_choice_acc_sae_lora_minus_sae.value",
    ("claims 27 status", "-0.75", 1): D + "multiple_choice_acc_lora_minus_original.value",
    ("claims 27 SmolLM2-135M", "1.40", 1): N + "row27_hellaswag_sae_lora_minus_sae_in_se.value",
    ("claims 28 ours", "6.4", 1): D + "truthfulqa_gen_rouge1_acc_sae_lora_minus_sae_se.value",
    ("claims 28 ours", "1.2", 1): D + "truthfulqa_gen_bleu_acc_sae_lora_minus_sae_in_se.value",
    ("claims 28 ours", "2.0", 1): D + "truthfulqa_gen_rouge1_acc_sae_lora_minus_sae_in_se.value",
    ("claims 28 ours", "2.1", 1): D + "truthfulqa_gen_rouge2_acc_sae_lora_minus_sae_in_se.value",
    ("claims 28 status", "1.2-2.1", 1): D + "truthfulqa_gen_bleu_acc_sae_lora_minus_sae_in_se.value",
    ("claims 28 status", "1.2-2.1", 2): D + "truthfulqa_gen_rouge2_acc_sae_lora_minus_sae_in_se.value",
    ("claims 28 SmolLM2-135M", "12.5", 1): TQ + "benchmarks.sae.truthfulqa_gen.bleu_acc",
    ("claims 28 SmolLM2-135M", "12.5", 2): TQ + "benchmarks.sae.truthfulqa_gen.rouge1_acc",
    ("claims 28 SmolLM2-135M", "40.6", 1): TQ + "groups.0.benchmarks.sae_lora.truthfulqa_gen.bleu_acc",
    ("claims 28 SmolLM2-135M", "28.1", 2): TQ + "benchmarks.original.truthfulqa_gen.bleu_acc",
    ("claims 28 SmolLM2-135M", "34.4", 2): TQ + "benchmarks.original.truthfulqa_gen.rouge1_acc",
    ("claims 28 SmolLM2-135M", "12.5", 3): TQ + "benchmarks.original.truthfulqa_gen.rouge2_acc",
    ("claims 34 SmolLM2-135M", "8.2", 1): N + "row34_rise_to_65536_points.value",
    ("claims 34 SmolLM2-135M", "1.8", 1): N + "row34_rise_to_131072_points.value",
    ("claims 38 ours", "10.9", 1): "checks.json:truthfulqa_gen.lora.bleu_acc",
    ("claims 38 ours", "15.6", 1): "checks.json:truthfulqa_gen.original.bleu_acc",
    ("claims 38 ours", "4.7", 1): "checks.json:truthfulqa_gen.original.rouge2_acc",
    ("claims 38 status", "0.8", 1): D + "truthfulqa_gen_bleu_acc_lora_minus_original_in_se.value",
    ("claims 38 SmolLM2-135M", "31.2", 1): TQ + "groups.0.benchmarks.lora.truthfulqa_gen.bleu_acc",
    ("claims 38 SmolLM2-135M", "45.3", 1): TQ + "groups.0.benchmarks.lora.truthfulqa_gen.rouge1_acc",
    ("claims 38 SmolLM2-135M", "23.4", 1): TQ + "groups.0.benchmarks.lora.truthfulqa_gen.rouge2_acc",
    ("claims 38 SmolLM2-135M", "28.1", 1): TQ + "benchmarks.original.truthfulqa_gen.bleu_acc",
    ("claims 38 SmolLM2-135M", "34.4", 1): TQ + "benchmarks.original.truthfulqa_gen.rouge1_acc",
    ("claims 38 SmolLM2-135M", "12.5", 1): TQ + "benchmarks.original.truthfulqa_gen.rouge2_acc",
    ("claims 38 SmolLM2-135M", "1.62", 1): SD + "tqa_rouge2_acc_lora_minus_original_in_se.value",
    ("claims 42 ours", "3.0M", 1): D + "model_params.value",
    ("claims 9 ours", "0.62-1.11x", 1): "frontier-e2e4m.json:speedups.0.speedup",
    ("claims 10 ours", "0.62-1.11x", 1): "frontier-e2e4m.json:speedups.0.speedup",
    ("claims 9 status", "1.15-1.32x", 1): "frontier.json:speedups.0.speedup",
    ("claims 9 status", "1.15-1.32x", 2): "frontier.json:speedups.3.speedup",
    ("claims 9 status", "2.3x", 1): D + "rank4_over_rank64_train_seconds.value",
    ("claims 13 ours", "6.0x", 1): N + "row13_e2e_over_adapt_backward.value",
    ("claims 13 ours", "16.0x", 1): N + "row13_e2e4m_over_adapt_backward.value",
    ("claims 23 ours", "-0.35", 1): "checks.json:steering.ours.POSITIVE.lo",
    ("claims 23 ours", "-0.26", 1): "checks.json:steering.ours.POSITIVE.hi",
    ("claims 24 ours", "-0.13", 1): "checks.json:steering.ours.NEGATIVE.lo",
    ("claims 24 ours", "-0.08", 1): "checks.json:steering.ours.NEGATIVE.hi",
    ("claims 24 ours", "-4.17", 1): "checks.json:steering.authors.NEGATIVE.lo",
    ("claims 24 ours", "-1.06", 1): "checks.json:steering.authors.NEGATIVE.hi",
    ("claims 27 status", "3.5", 1): D + "multiple_choice_acc_sae_lora_minus_sae_se.value",
    ("claims 31 SmolLM2-135M", "+0.0007", 1): "smollm2/rerun-eval-r64-ce.json:eval.groups.0.distances.layers.3."
                                              "cos_change.mean",
    ("claims 39 ours", "0.144", 1): D + "frontier_ckpt100_initial_gap_nats.value",
    ("claims 39 SmolLM2-135M", "13.3", 1): N + "row39_one_minus_three_saes_points.value",
}
SETTINGS = {  # whole numbers that name a setting: bound to "-"
    "claims 4 SmolLM2-135M": ("128", "1M"), "claims 6 SmolLM2-135M": ("22", "1M"), "claims 9 SmolLM2-135M": ("1M",),
    "claims 10 SmolLM2-135M": ("40", "60", "80", "100%", "60%", "32k"), "claims 14 SmolLM2-135M": ("1M",),
    "claims 17 SmolLM2-135M": ("1M",), "claims 20 status": ("20",), "claims 22 SmolLM2-135M": ("20", "47k"),
    "claims 27 SmolLM2-135M": ("400",), "claims 38 SmolLM2-135M": ("64",), "claims 39 ours": ("10", "20", "30", "100%"),
}
OVERRIDES.update({(w, t, 0): "-" for w, toks in SETTINGS.items() for t in toks})


def candidates(files, where, text, folder):
    """The files a cell's numbers are looked for in, in order: the row's (HINTS), those the row names, the
    differences and spreads (noise.json), the column folder's derived values; nothing else (no match: "?")."""
    kind, row = where.split()[0], where.split()[1]
    label = where.split()[2] if kind == "claims" else ""
    column = "results" if kind == "results" else "SmolLM2" if label.startswith("SmolLM2") else \
        "Gemma-3" if label.startswith("Gemma-3") else "ours"
    hints = HINTS[column].get(int(row), [])
    named = [f for f in files if os.path.basename(f) in text or f in text]
    named += [f for f in files if re.search(rf"run\.py {re.escape(f[:-5])}\b", text)]
    if label == "status":  # a status rests on differences and standard errors first
        hints = ["noise.json", "derived.json"] + hints
    order = hints + named + ["noise.json", os.path.join(folder, "derived.json")]
    return [f for i, f in enumerate(order) if f in files and f not in order[:i]]


def propose(where, cell, text, folder, files, exempt):
    out, seen = [], {}
    order = candidates(files, where, text, folder)
    row = where.split()[1]
    for tok, v, tol in tc.reported(cell, exempt):
        seen[tok] = seen.get(tok, 0) + 1
        best = OVERRIDES.get((where, tok, seen[tok])) or OVERRIDES.get((where, tok, 0))
        if best:
            out.append((tok, best))
            continue
        for quiet in (True, False):
            for f in order:
                for key, x in sorted(files[f], key=lambda kv: (f"row{row}_" not in kv[0], kv[0].count("."))):
                    if quiet and any(n in key for n in NOISY):
                        continue
                    if tc.backed(v, tol, [x]):
                        best = f"{f}:{key}"
                        break
                if best:
                    break
            if best:
                break
        if best is None and "." not in tok:
            best = "-"  # a whole number no results file holds: a setting or a name (a layer, k, a token budget)
        out.append((tok, best or "?"))
    return out


def main():
    files = load_all()
    have = tc.read_sources()
    lines = []
    for where, cell, text, folder, exempt in tc.cells():
        if where in have:
            continue
        for tok, src in propose(where, cell, text, folder, files, exempt):
            lines.append(f"{where}\t{tok}\t{src}")
    with open(tc.SOURCES, "a") as f:
        f.writelines(ln + "\n" for ln in lines)
    print(f"{len(lines)} numbers proposed, {sum(ln.endswith('?') for ln in lines)} without a source")


if __name__ == "__main__":
    main()
