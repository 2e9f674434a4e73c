"""
Did adapting help, and what did it cost? The paper's evaluations (Secs. 4-6) for any model + SAE(s) + adapter(s).
TruthfulQA generation (--truthfulqa-gen, Table 5's BLEU / ROUGE) is in truthfulqa.py, text generation in generate.py.

    python eval.py                        # embedded tiny pipeline (+ adapt.py's out/adapt-tiny/adapter if present)
    python eval.py --model google/gemma-2-2b --layer 12 --adapter out/adapt/adapter --data data/pile \
        --mmlu cais/mmlu --hellaswag Rowan/hellaswag --truthfulqa truthfulqa/truthful_qa \
        --truthfulqa-gen truthfulqa/truthful_qa --generate "The capital of France is" \
        --steering-pos pos.jsonl --steering-neg law.json --steering-neg arabic.json --steering-neg-val biology.json \
        --latent 13677

The four settings of Sec. 5.3: original (adapters off, no SAE), sae (adapters off, SAE spliced), sae_lora (adapters on,
SAE spliced), lora (adapters on, no SAE). The adapters run beside the weights, as adapt.py trains and evaluates them,
not merged into them: under bf16 autocast a merged W + BA is rounded to bf16 as one weight, a slightly other model
(lora.adapters_enabled). Several --sae are spliced together: the sae
rows are then the compound CE of Sec. 4.3. Several --adapter give one row group each, every adapter loaded into a
fresh copy of the model (Sec. 6.3's single-layer adapters and rank sweeps are just adapters on disk). Steering is in
steering.py, the multiple-choice benchmarks in multiple_choice.py.

What each section computes (eval.json holds every number, eval.md the tables, *.png the figures):
- core: on held-out windows (every one starts with BOS), CE and KL(p_orig || p_setting) as splice.py defines them:
  means over the predicted positions (`positions` counts them), the numbers adapt.py reports as ce_* and kl_*; gap
  closed = (CE_sae - CE_sae_lora) / (CE_sae - CE_original). Per SAE, on the original model's activations where it
  reads them (`site`: the stream after its block, or inside it: attention heads, attention or MLP output; a
  transcoder: x its MLP input, the target y its MLP output), over the positions it replaces (`replaced`; BOS kept
  unless --sae-positions): FVU = sum |y - x_hat|^2 / sum |y - mean y|^2 (y = x but for transcoders), L0 = mean active latents per token, dead latents = latents active on none of these tokens;
  the same on the adapted model's own activations (differs only for adapters on layers before the SAE).
- per_token (Fig. 8): d = CE_sae_lora - CE_sae per predicted position (< 0: LoRA improved it); shares improved /
  degraded / unchanged (|d| <= 1e-6), and |d| histograms of improved and degraded positions on log-spaced bins
  (values outside the bin range are counted in the end bins, so improved + degraded + unchanged = `positions`).
- distances (Fig. 11): for each layer from the (first) SAE's on, cosine similarity and L2 distance between the original
  model's residual stream after that block and the spliced one (an SAE inside block L: from block L's output on), base model (sae) and adapted model (sae_lora), averaged per sequence
  two ways, both reported: "distances" (ours) over the positions the SAE replaces (non-BOS by default);
  "distances_authors" over all positions, BOS included, as activation_distances.py:118-125 (equal under
  --sae-positions all, the authors' splice for their sparsify SAEs). Each: mean over sequences with a 90%
  normal-approximation CI (mean +- 1.645 sd / sqrt(n)) and the paired per-sequence change adapted - base, as their
  plot_metrics. (Their run: fp32 model, no autocast: --autocast float32; 500 Pile documents of >= 1024 tokens.)
"""
from __future__ import annotations

import json
import os
from dataclasses import asdict

import numpy as np
import torch
import torch.nn.functional as F

from plumbing import common
from plumbing import distributed
from evals import confidence
from formats import disk
from plumbing import embedded
from evals import generate
from evals import report
from evals import multiple_choice
from evals import steering
from evals import truthfulqa
from formats.peft import load_adapter
from lora import adapters_disabled, adapters_enabled
from config.eval import EvalConfig
from formats import run_folder
from model import Transformer
from formats.sae_files import load_saes
from evals.held_out import accumulate, gap_closed, position_means, predicted_positions
from splice import compile_step, hook_key, kl_and_ce, spliced_pass, unspliced_tokens

SETTINGS = ("original", "sae", "sae_lora", "lora")
NAMES = {"original": "Original", "sae": "SAE", "sae_lora": "SAE + LoRA", "lora": "LoRA"}
UNCHANGED_TOL = 1e-6  # nats: a per-token change at most this small counts as unchanged


# ----------------------------------------------------------------------------------------------------------------------
# Core table (Sec. 4), per-token breakdown (Sec. 6.1), activation distances (Sec. 6.2)


class SAEStats:
    """FVU, L0 and latent usage of one SAE over the tokens it reads."""

    def __init__(self, sae):
        self.sae, self.n, self.err, self.sq, self.l0 = sae, 0, 0.0, 0.0, 0.0
        self.sum = torch.zeros(sae.W_dec.shape[1], dtype=torch.float64, device=sae.W_dec.device)
        self.fired = torch.zeros(sae.d_sae, dtype=torch.bool, device=sae.W_dec.device)

    def update(self, x, target=None):  # (N, d_in); target: what the decoder reproduces when not x (a transcoder's)
        if not len(x):
            return
        yd = (x if target is None else target).double()
        self.err += (yd - self.sae(x).double()).pow(2).sum().item()
        self.sum += yd.sum(0)
        self.sq += yd.pow(2).sum().item()
        self.n += len(x)
        if self.sae.arch == "topk":
            values, indices = self.sae.encode_topk(x)
            active = values > 0
            self.l0 += active.sum().item()
            self.fired[indices[active]] = True
        else:  # dense codes, a slice of tokens at a time (d_sae can be 100k+)
            step = max(1, (1 << 24) // self.sae.d_sae)
            for s in range(0, len(x), step):
                active = self.sae.encode(x[s:s + step]) != 0
                self.l0 += active.sum().item()
                self.fired |= active.any(0)

    def result(self) -> dict:
        var = self.sq - (self.sum.pow(2).sum().item() / max(self.n, 1))
        dead = int((~self.fired).sum())
        return {"fvu": self.err / var if var > 0 else float("nan"), "l0": self.l0 / max(self.n, 1),
                "dead": dead, "dead_frac": dead / self.sae.d_sae, "replaced": self.n}


@torch.no_grad()
def core_eval(model, saes, batches, unspliced_ids, cfg: EvalConfig, autocast_ctx, *, adapted: bool, label: str = "",
              loss_fn=None) -> dict:
    first, n_layer = saes[0][0], model.cfg.n_layer
    settings = SETTINGS if adapted else SETTINGS[:2]
    sums, n = {}, 0  # per-position CE and KL summed on the device (held_out.accumulate): read back once, at the end
    by_layer = {layer: i for i, (layer, sae) in enumerate(saes) if sae.site == "resid"}  # the rest: inside_block
    stats = {s: [SAEStats(sae) for _, sae in saes] for s in (("original", "lora") if adapted else ("original",))}
    spliced = [s for s in settings if "sae" in s]
    seq = {f: {s: {layer: {"cos": [], "l2": []} for layer in range(first, n_layer)} for s in spliced}
           for f in DISTANCES}  # formulation -> setting -> layer -> per-sequence values
    token_ce = {s: [] for s in spliced}
    prog = common.Progress(len(batches), f"core{label}")
    for idx in batches:
        spliced_at = ~torch.isin(idx, torch.tensor(unspliced_ids, dtype=idx.dtype, device=idx.device))  # the SAE's
        acts = {}

        def stats_pass(setting):
            """The model without SAEs (original, or with the adapters alone), each SAE's statistics taken where it
            reads: after its block (and, for the distances, every stream from `first` on), or inside its block (the
            input, and a transcoder's target, where the splice reads them)."""
            def after_block(layer):
                def hook(x):
                    if layer in by_layer:
                        stats[setting][by_layer[layer]].update(x[spliced_at])
                    if setting == "original" and cfg.distances and layer >= first:
                        acts[layer] = x
                    return x
                return hook

            def inside_block(sae, st):
                def hook(x):
                    st.update(x[spliced_at])
                    return x

                def mlp(h, mlp_out):
                    y = mlp_out(h)
                    st.update(h[spliced_at], y[spliced_at])
                    return y
                return mlp if sae.transcoder else hook
            hooks = {hook_key(layer, sae): inside_block(sae, stats[setting][i]) for i, (layer, sae) in enumerate(saes)
                     if sae.site != "resid"}
            hooks.update({layer: after_block(layer) for layer in range(n_layer)})
            return model.blocks(model.embed(idx), hooks=hooks)

        def distances_to_original(setting):
            def observe(layer, _, y):
                if layer >= first:  # both formulations (splice.DISTANCES) from the same streams
                    for (f, name), v in stream_distances(acts[layer], y, spliced_at).items():
                        seq[f][setting][layer][name].append(v.cpu().numpy())
            return observe if cfg.distances else None

        finals = {}
        skipped = {"sae": [], "sae_lora": []}  # --skip-norm-above: where the norm rule left the SAEs out
        with autocast_ctx, adapters_disabled(model):
            finals["original"] = stats_pass("original")
            finals["sae"] = spliced_pass(model, saes, idx, unspliced_ids, observe=distances_to_original("sae"),
                                          skipped=skipped["sae"])
        if adapted:
            with autocast_ctx, adapters_enabled(model):  # not merged: adapt.py's model (lora.adapters_enabled)
                finals["lora"] = stats_pass("lora")
                finals["sae_lora"] = spliced_pass(model, saes, idx, unspliced_ids, skipped=skipped["sae_lora"],
                                                  observe=distances_to_original("sae_lora"))
        for s, masks in skipped.items():
            if masks:  # counted on the predicted positions, as held_out.evaluate
                accumulate(sums, **{f"norm_skipped_{s}": sum(mask[:, :-1].sum() for mask in masks)})
        acts.clear()
        # CE and KL(p_orig || p_setting) at every predicted position, as splice.py defines them (adapt.py's numbers)
        for s in settings[1:]:
            with autocast_ctx:
                kl, ce, ce_orig = kl_and_ce(model, finals["original"], finals[s], idx, chunk=cfg.chunk,
                                            loss_fn=loss_fn)
            accumulate(sums, **{f"kl_{s}": kl, f"ce_{s}": ce})
            if s in token_ce:
                token_ce[s].append(ce)
        accumulate(sums, ce_original=ce_orig)  # the same from every setting's call
        n += predicted_positions(idx)
        prog.step()

    m = position_means(sums, n)
    res = {"positions": m["positions"], "settings": {s: {"ce": m[f"ce_{s}"], "kl": m.get(f"kl_{s}", 0.0)}
                                                     for s in settings}}
    ce = {s: res["settings"][s]["ce"] for s in settings}
    res["gap"] = ce["sae"] - ce["original"]
    if any(k.startswith("norm_skipped_") for k in m):  # counts over every process: the means times the positions
        res["norm_skipped"] = {k.removeprefix("norm_skipped_"): round(v * m["positions"]) for k, v in m.items()
                               if k.startswith("norm_skipped_")}
    if adapted:
        res["gap_closed"] = gap_closed(ce["original"], ce["sae"], ce["sae_lora"])
        res["per_token"] = token_breakdown(*(torch.cat(token_ce[s]).cpu().numpy() for s in ("sae", "sae_lora")))
    res["sae_stats"] = [dict(layer=layer, site=sae.site, arch=sae.arch, d_sae=sae.d_sae, **stats["original"][i].result())
                        for i, (layer, sae) in enumerate(saes)]
    if adapted:
        for i, r in enumerate(res["sae_stats"]):
            r.update({f"{k}_lora": v for k, v in stats["lora"][i].result().items() if k != "replaced"})
    if cfg.distances:
        res["distances"] = distance_summary(seq["ours"], first, "ours")
        res["distances_authors"] = distance_summary(seq["authors"], first, "authors")
    return res


def token_breakdown(ce_sae: np.ndarray, ce_sae_lora: np.ndarray, per_decade: int = 4, lo: int = -6,
                    hi: int = 2) -> dict:
    """Fig. 8: how the LoRA change in loss is spread over tokens."""
    d = ce_sae_lora.astype(np.float64) - ce_sae.astype(np.float64)
    edges = 10.0 ** np.linspace(lo, hi, (hi - lo) * per_decade + 1)
    imp, deg = d < -UNCHANGED_TOL, d > UNCHANGED_TOL

    def hist(a, weights=None):  # |d| clipped into the bin range: the end bins count what lies beyond, so the
        return np.histogram(np.clip(a, edges[0], np.nextafter(edges[-1], 0)), edges, weights=weights)[0]  # sum is exact
    n = len(d)
    q = [1, 5, 25, 50, 75, 95, 99]
    return {"positions": n, "improved": int(imp.sum()), "degraded": int(deg.sum()),
            "unchanged": int(n - imp.sum() - deg.sum()), "share_improved": imp.mean(), "share_degraded": deg.mean(),
            "share_unchanged": 1 - imp.mean() - deg.mean(), "mean_change": d.mean(),
            "nats_improved": -d[imp].sum(), "nats_degraded": d[deg].sum(), "unchanged_tol": UNCHANGED_TOL,
            "quantiles": dict(zip((f"p{p}" for p in q), np.percentile(d, q).tolist())) if n else {},
            "bin_edges": edges.tolist(), "hist_improved": hist(-d[imp]).tolist(),
            "hist_degraded": hist(d[deg]).tolist(),
            "nats_improved_per_bin": hist(-d[imp], -d[imp]).tolist(),
            "nats_degraded_per_bin": hist(d[deg], d[deg]).tolist()}


# How far the spliced stream is from the original one (Sec. 6.2, Fig. 11), in two formulations
DISTANCES = {
    "ours": "per sequence, mean over the positions the SAE replaces (--sae-positions; non-BOS by default)",
    "authors": "as activation_distances.py:118-125 computes it: per sequence, mean over all positions (BOS included)"}


def stream_distances(orig, spliced, replaced) -> dict:
    """Cosine similarity and L2 distance between the original model's stream and a spliced one, (B, T, d) each, per
    position, averaged per sequence in each formulation of DISTANCES: {(formulation, "cos" | "l2"): (B,)}. `replaced`
    (B, T) marks the positions the SAE replaces. The authors' code runs one sequence at a time and takes
    torch.norm(o - s, p=2, dim=-1).mean() and cosine_similarity(o, s, dim=1).mean() over all its positions."""
    a, b, w = orig.float(), spliced.float(), replaced.float()
    out = {}
    for name, v in (("cos", F.cosine_similarity(a, b, dim=-1)), ("l2", (a - b).norm(dim=-1))):
        out["ours", name] = (v * w).sum(1) / w.sum(1).clamp_min(1)
        out["authors", name] = v.mean(1)
    return out


def distance_summary(seq: dict, first: int, formulation: str) -> dict:
    """seq[setting][layer][name]: per-sequence values (arrays) for "sae" and, with an adapter, "sae_lora". Mean over
    sequences with a 90% normal CI (mean +- 1.645 sd / sqrt(n)) and the paired per-sequence change sae_lora - sae, as
    activation_distances.py:200-216 (both formulations)."""
    out = {"formulation": formulation, "how": DISTANCES[formulation], "first_layer": first,
           "ci": "90% normal approximation over sequences", "layers": []}
    for layer in seq["sae"]:
        row = {"layer": layer, "after_sae": layer - first}
        for name in ("cos", "l2"):
            base = np.concatenate(seq["sae"][layer][name])
            row[f"{name}_sae"] = confidence.mean_ci(base)
            if "sae_lora" in seq:
                lora = np.concatenate(seq["sae_lora"][layer][name])
                row[f"{name}_sae_lora"] = confidence.mean_ci(lora)
                row[f"{name}_change"] = confidence.mean_ci(lora - base)  # paired by sequence
        out["layers"].append(row)
    return out


# ----------------------------------------------------------------------------------------------------------------------


def main(argv=None) -> dict:
    cfg, typed = common.parse_args(EvalConfig, argv, epilog=embedded.preset_help("eval"))
    steer = steering.requested(cfg)
    benches = {b: getattr(cfg, b) for b in ("mmlu", "hellaswag", "truthfulqa") if getattr(cfg, b)}
    if cfg.model is None and not cfg.adapter and os.path.isfile("out/adapt-tiny/adapter/adapter_config.json"):
        cfg.adapter = ["out/adapt-tiny/adapter"]  # what `python adapt.py` wrote
        common.log("eval.py: no --model and no --adapter: evaluating out/adapt-tiny/adapter (python adapt.py's)")
    # the CE table (with per-token and distances) needs held-out tokens: a real model without --data reads the stdlib
    # corpus in its own tokens unless only other evaluations were asked for and no flag of the table was typed
    others = steer or benches or cfg.truthfulqa_gen or cfg.generate
    table = cfg.model is None or not others or bool(typed & {"eval_tokens", "distances", "sae_positions"})
    embedded.fill_in(cfg, typed, "eval", need_data=table or cfg.truthfulqa_gen == "corpus")
    if cfg.data is None:
        common.log("eval.py: no --data: the CE table, per-token breakdown and distances are left out (pass --data "
                   "DIR, or --eval-tokens N for the stdlib corpus in the model's tokens)")
    # --out checked and locked first (formats/run_folder.py: a new or empty folder, or --overwrite; never an input's)
    inputs = [cfg.model, *cfg.sae, *cfg.adapter, cfg.data, cfg.tokenizer, cfg.steering_pos, *cfg.steering_neg,
              cfg.steering_neg_val, cfg.mmlu, cfg.hellaswag, cfg.truthfulqa, cfg.truthfulqa_gen]
    with run_folder.claim(cfg.out, overwrite=cfg.overwrite, outputs=OUTPUTS, inputs=inputs):
        return evaluate_all(cfg)


OUTPUTS = ("eval.json", "eval.md", "eval.partial.json", "*.png")  # what eval.py writes to --out


def evaluate_all(cfg: EvalConfig) -> dict:
    """Every evaluation cfg asks for, written to cfg.out (eval.json, eval.md, the plots)."""
    # -- read every input before any model work: bad files fail in a second, not after an hour -----------------------
    steer = steering.requested(cfg)
    benches = {b: getattr(cfg, b) for b in ("mmlu", "hellaswag", "truthfulqa") if getattr(cfg, b)}
    texts = steering.read_inputs(cfg) if steer else {}
    rows = {b: multiple_choice.read_rows(src, b) for b, src in benches.items()}
    bench_qs = {b: multiple_choice.questions(r[:cfg.bench_limit] if cfg.bench_limit else r, where, b,
                                             cfg.truthfulqa_preset) for b, (r, where) in rows.items()}
    gen_qs = truthfulqa.read_questions(cfg.truthfulqa_gen, cfg.bench_limit, cfg.data) if cfg.truthfulqa_gen else []

    # -- model, SAEs, held-out tokens ----------------------------------------------------------------------------------
    ddp = distributed.setup(cfg.device)
    cfg.autocast = common.resolve_autocast(ddp.device, cfg.autocast)  # auto: what this hardware runs fast
    autocast_ctx = common.autocast(ddp.device, cfg.autocast)
    dtype = getattr(torch, cfg.dtype)
    model = Transformer.from_pretrained(cfg.model, dtype=dtype, device=ddp.device).requires_grad_(False)
    if cfg.layer and len(cfg.layer) != len(cfg.sae):
        raise ValueError(f"--layer names {len(cfg.layer)} layers for {len(cfg.sae)} SAEs: give one per --sae")
    loaded = sorted(((*load_saes([p], [cfg.layer[i]] if cfg.layer else None, model, ddp.device)[0], p)
                     for i, p in enumerate(cfg.sae)), key=lambda t: t[0])  # by layer, each with its path
    if len({layer for layer, _, _ in loaded}) < len(loaded):
        raise ValueError("two SAEs at the same layer: give each --sae its own --layer")
    saes = [(layer, sae) for layer, sae, _ in loaded]
    for flag, on in (("--steering-pos", steer), ("--saebench", cfg.saebench)):
        first, path = loaded[0][1], loaded[0][2]
        if on and first.site != "resid":  # both read and steer the residual stream at the (first) SAE's layer
            raise ValueError(f"{flag}: needs a residual-stream SAE (blocks.L.hook_resid_post) as the first --sae; "
                             f"{path} is {'a transcoder' if first.transcoder else 'an SAE on ' + str(first.hook_name)}")
    for adapter in cfg.adapter:
        check_adapter(model, adapter, saes, cfg.model)
    bos_id = model.cfg.bos_token_id
    if gen_qs or cfg.generate:
        generate.check_args(cfg, model.cfg.max_seq_len)
    unspliced_ids = unspliced_tokens(saes, model.cfg, cfg.sae_positions, cfg.skip_norm_above)  # SAE-free positions
    batches = load_batches(cfg, model, min(cfg.seq_len, model.cfg.max_seq_len), ddp.device) if cfg.data else []
    tok = None
    if texts or bench_qs or gen_qs or cfg.generate:
        from formats.tokenizer import load_tokenizer
        tok = load_tokenizer(cfg.tokenizer or cfg.model)
        if (bos_id is not None and tok.bos_id != bos_id) or tok.vocab_size > model.cfg.vocab_size:
            raise ValueError(f"tokenizer {tok.path} (bos {tok.bos_id}, {tok.vocab_size} tokens) does not belong to the "
                             f"model (bos {bos_id}, {model.cfg.vocab_size} tokens): pass --tokenizer")
    prepared = {b: (qs, *multiple_choice.bench_sequences(qs, tok, model.cfg.max_seq_len)) for b, qs in bench_qs.items()}
    if steer:
        s_layer, s_sae = saes[0]
        if not 0 <= cfg.latent < s_sae.d_sae:
            raise ValueError(f"--latent {cfg.latent} is out of range: the SAE at layer {s_layer} has {s_sae.d_sae}")
        direction = s_sae.W_dec[cfg.latent].detach().float()  # the raw decoder row (steering.py normalises it)
        seqs = {k: [([bos_id] + tok.encode(t))[:model.cfg.max_seq_len] for t in ts] for k, ts in texts.items()}

    # -- the settings, adapter by adapter ------------------------------------------------------------------------------
    res = {"model": cfg.model, "config": asdict(cfg), "config_sources": common.sources(cfg), "device": str(ddp.device),
           "saes": [dict(path=p, layer=layer, site=s.site, arch=s.arch, d_sae=s.d_sae) for layer, s, p in loaded], "groups": []}

    def partial():  # every part as it is done: a later failure loses none of them (eval.json: when all are)
        disk.write_text(os.path.join(cfg.out, "eval.partial.json"), json.dumps(disk.jsonable(res), indent=1))

    def benchmarks(settings):  # multiple choice and TruthfulQA generation
        return {s: {**multiple_choice.evaluate(model, prepared, saes, unspliced_ids, cfg, autocast_ctx, s),
                    **truthfulqa.evaluate(model, tok, gen_qs, saes, unspliced_ids, cfg, autocast_ctx, s)}
                for s in settings}
    if bench_qs or gen_qs:  # adapter-independent settings: computed once
        res["benchmarks"] = benchmarks(("original", "sae"))
        partial()
    if cfg.generate:
        res["generations"] = generate.show(model, tok, cfg.generate, ("original", "sae"), saes, unspliced_ids, cfg,
                                           autocast_ctx)
        partial()
    if steer:  # both formulations (steering.py), each with the base model's numbers
        head = {"latent": cfg.latent, "layer": s_layer, "splice": cfg.steering_splice}
        ours, authors = steering.steering_eval(model, seqs, saes, direction, s_layer, unspliced_ids, cfg, autocast_ctx,
                                               "original")
        res["steering"] = {**head, "formulation": steering.OURS, "base": ours}
        res["steering_authors"] = {**head, "formulation": steering.AUTHORS, "base": authors}
        partial()
    names = [os.path.basename(os.path.normpath(a)) for a in cfg.adapter]
    names = names if len(set(names)) == len(names) else list(cfg.adapter)  # e.g. several runs' ".../adapter"
    for gi, adapter in enumerate(cfg.adapter or [None]):
        if gi > 0:  # a fresh model per adapter: adapters of other ranks / layers cannot share LoRA modules
            del model
            model = Transformer.from_pretrained(cfg.model, dtype=dtype, device=ddp.device).requires_grad_(False)
        g = {"adapter": adapter, "name": names[gi] if adapter else "(none)"}
        if adapter:
            load_adapter(model, adapter)
            model.requires_grad_(False)
            common.log(f"adapter {adapter}")
        if batches:
            loss_fn = compile_step(model, cfg.compile)  # every call of the CE table's passes has one shape
            g.update(core_eval(model, saes, batches, unspliced_ids, cfg, autocast_ctx, adapted=adapter is not None,
                               label=f" [{g['name']}]", loss_fn=loss_fn))
            compile_step(model, False)
        if adapter and (bench_qs or gen_qs):
            g["benchmarks"] = benchmarks(("sae_lora", "lora"))
        if adapter and cfg.generate:
            g["generations"] = generate.show(model, tok, cfg.generate, ("sae_lora", "lora"), saes, unspliced_ids, cfg,
                                             autocast_ctx)
        if adapter and steer:
            g["steering"], g["steering_authors"] = steering.steering_eval(
                model, seqs, saes, direction, s_layer, unspliced_ids, cfg, autocast_ctx, "lora",
                authors_alpha=res["steering_authors"]["base"]["alpha"])  # the authors: one alpha for both models
            g["steering_compare"] = steering.steering_compare(res["steering"]["base"], g["steering"])
            g["steering_authors_compare"] = steering.authors_compare(res["steering_authors"]["base"],
                                                                     g["steering_authors"])
        res["groups"].append(g)
        partial()
    if cfg.saebench:  # on the last adapter's model (Table 6 compares one adapter with the base model)
        from evals import saebench
        res["saebench"] = saebench.evaluate(model, saes, cfg, ddp.device, autocast_ctx)

    # -- reports -------------------------------------------------------------------------------------------------------
    disk.write_text(os.path.join(cfg.out, "eval.json"), json.dumps(disk.jsonable(res), indent=1))
    md = report.markdown(disk.jsonable(res)) + ("\n" + res["saebench"]["markdown"] if cfg.saebench else "")
    disk.write_text(os.path.join(cfg.out, "eval.md"), md)
    if os.path.isfile(os.path.join(cfg.out, "eval.partial.json")):  # eval.json holds all of it now
        os.remove(os.path.join(cfg.out, "eval.partial.json"))
    res["plots"] = report.plots(disk.jsonable(res), cfg.out) if cfg.plots else []
    print(md)
    common.log(f"wrote {os.path.join(cfg.out, 'eval.json')}, eval.md" +
               (f" and {len(res['plots'])} plots" if res["plots"] else ""))
    return res


def check_adapter(model, folder: str, saes=(), model_name: str | None = None):
    """Every adapter matches the model, checked from the file headers before any evaluation starts (load_adapter checks
    again, but only when its turn comes)."""
    from formats.checkpoint import safetensors_header
    from formats.peft import CONFIG_NAME, PREFIX, WEIGHTS_NAME, base_mismatch, read_config, sae_mismatch
    path = os.path.join(folder, WEIGHTS_NAME)
    if not (os.path.isfile(os.path.join(folder, CONFIG_NAME)) and os.path.isfile(path)):
        raise FileNotFoundError(f"--adapter {folder}: no {CONFIG_NAME} + {WEIGHTS_NAME} (not a PEFT adapter folder)")
    read_config(folder)  # not JSON, or a value of the wrong type: a line that names the file, now
    for key, (dtype, shape, _, _) in safetensors_header(path).items():  # truncated: a line that names the file
        if not dtype.is_floating_point:
            raise ValueError(f"{path}: tensor {key} is {dtype}, not a floating-point weight (a damaged or foreign "
                             f"file)")
        name, ab = key.removeprefix(PREFIX).rsplit(".lora_", 1)
        try:
            lin = model.get_submodule(name)
        except AttributeError:
            lin = None
        got, want = (shape[1], getattr(lin, "in_features", None)) if ab.startswith("A") else \
            (shape[0], getattr(lin, "out_features", None))
        if got != want:
            raise ValueError(f"--adapter {folder}: tensor {key} (shape {tuple(shape)}) does not fit this model's "
                             f"{name} (adapter for another model?)")
    for other in (sae_mismatch(folder, saes), base_mismatch(folder, model_name)):
        if other:
            common.log(f"eval.py: warning: {other}")


def load_batches(cfg: EvalConfig, model, seq_len: int, device) -> list[torch.Tensor]:
    from data import TokenLoader, check_data_matches, eval_batches_for, held_out_batches
    check_data_matches(cfg.data, cfg.model)  # one line if the tokens were made by another tokenizer
    loader = TokenLoader(cfg.data, cfg.eval_split, cfg.batch_size, seq_len, shuffle=False, device=device)
    batch = min(cfg.batch_size, loader.n_windows)  # never repeat a window to fill a batch
    if batch < cfg.batch_size:
        loader = TokenLoader(cfg.data, cfg.eval_split, batch, seq_len, shuffle=False, device=device)
    return held_out_batches(loader, eval_batches_for(cfg.eval_tokens, batch, seq_len), f"--eval-tokens "
                            f"{cfg.eval_tokens:,}", "--seq-len")


if __name__ == "__main__":
    common.cli(main)
