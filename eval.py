"""
Did adapting help, and what did it cost? The paper's evaluations (Secs. 4-6) for any model + SAE(s) + adapter(s).

    python eval.py                        # embedded tiny pipeline (+ adapt.py's out/adapt-tiny/adapter if present)
    python eval.py --model google/gemma-2-2b --sae google/gemma-scope-2b-pt-res/layer_12/width_16k/average_l0_82 \
        --adapter out/adapt/adapter --data data/pile --mmlu cais/mmlu --hellaswag Rowan/hellaswag \
        --truthfulqa truthfulqa/truthful_qa --steering-pos pos.jsonl --steering-neg neg.jsonl \
        --steering-neg-val negval.jsonl --latent 13677

The four settings of Sec. 5.3: original (adapters off, no SAE), sae (adapters off, SAE spliced), sae_lora (adapters
merged into the weights, SAE spliced), lora (adapters merged, no SAE). Several --sae are spliced together: the sae
rows are then the compound CE of Sec. 4.3. Several --adapter give one row group each, every adapter loaded into a
fresh copy of the model (Sec. 6.3's single-layer adapters and rank sweeps are just adapters on disk).

What each section computes (eval.json holds every number, eval.md the tables, *.png the figures):
- core: on held-out windows (every one starts with BOS), next-token CE per token and KL(p_orig || p_setting) per
  token, both means over all predicted tokens; gap closed = (CE_sae - CE_sae_lora) / (CE_sae - CE_original).
  Per SAE, on the original model's activations at its layer, over the tokens it replaces (BOS kept unless
  --splice-bos): FVU = sum |x - x_hat|^2 / sum |x - mean x|^2, L0 = mean active latents per token, dead latents =
  latents active on none of these tokens; the same on the adapted model's own activations (differs only for adapters
  on layers before the SAE).
- per_token (Fig. 8): d = CE_sae_lora - CE_sae per token (< 0: LoRA improved it); shares improved / degraded /
  unchanged (|d| <= 1e-6), and |d| histograms of improved and degraded tokens on log-spaced bins (values outside
  the bin range are counted in the end bins, so improved + degraded + unchanged counts = the token count).
- distances (Fig. 11): for each layer from the (first) SAE's on, cosine similarity and L2 distance between the original
  model's residual stream and the spliced one, base model (sae) and adapted model (sae_lora), averaged over non-BOS
  tokens per sequence; mean over sequences with a 90% normal-approximation CI (mean +- 1.645 sd / sqrt(n)), and the
  paired per-sequence change adapted - base, as the authors' code does.
- steering (Sec. 5.2, Eq. 8): x <- x + alpha (x . v) v at the SAE's layer, v the unit-normalised decoder row of
  --latent, applied to every position of the model *without* the SAE spliced (the authors' run_steering.py hooks the
  plain layer output; the SAE only supplies v; --steering-splice true steers the reconstruction instead). A text's
  score is its mean next-token log-likelihood (all tokens after BOS). Normalisation, per model and per text set: the
  unsteered scores are mapped affinely onto 0..100 (min -> 0, max -> 100) and the steered ones with the same map; the
  change is normalised steered - normalised unsteered. alpha is tuned per model over --alphas to maximise
  mean change(positive) - mean change(validation negatives); the negative test set is scored at that alpha.
  POSITIVE / NEGATIVE = per-text change of the LoRA model minus that of the base model, mean with a 90% normal CI.
- benchmarks (Sec. 5.3): lm-evaluation-harness' zero-shot prompts (MMLU with its subject header and " A".." D",
  HellaSwag's preprocessed context and endings, TruthfulQA-MC1 with its six-question QA preset); each choice scored
  by the summed log-probability of its continuation tokens after BOS + prompt; acc = argmax of the sums (MMLU, MC1),
  acc_norm = argmax of sum / len(choice in characters) (HellaSwag's headline metric, as lm-eval); standard error
  sd(correct, ddof=1) / sqrt(n). SAEs spliced from position 1 (BOS keeps its activation).
"""
from __future__ import annotations

import json
import math
import os
import sys
import time
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from benchmarks import bench_scores, bench_sequences, questions, read_rows
import common
from adapt import gap_closed, load_saes
from lora import adapters_disabled, load_adapter, merged
from model import Transformer
from sae import splice_hooks

SETTINGS = ("original", "sae", "sae_lora", "lora")
NAMES = {"original": "Original", "sae": "SAE", "sae_lora": "SAE + LoRA", "lora": "LoRA"}
UNCHANGED_TOL = 1e-6  # nats: a per-token change at most this small counts as unchanged
Z90 = 1.645


@dataclass
class EvalConfig:
    """Evaluate model + SAE(s) + LoRA adapter(s): CE/KL table, per-token breakdown, distances, steering, benchmarks."""
    model: str | None = None  # HF folder or hub id; None = the embedded tiny pipeline
    sae: list[str] = field(default_factory=list)  # SAE folders / hub paths; several are spliced together
    layer: str | None = None  # "12" or "10,20": SAE layers, overriding the SAE files
    adapter: list[str] = field(default_factory=list)  # PEFT adapter folders; one row group each
    tokenizer: str | None = None  # default: the model folder / hub id
    data: str | None = None  # token dataset (data.prepare); its val split is the held-out set
    out: str = "out/eval"
    eval_tokens: int = 1_000_000  # paper: 1M held-out tokens (Sec. 4); 500k for the distances (Sec. 6.2)
    batch_size: int = 4
    seq_len: int = 1024
    splice_bos: bool = False  # BOS keeps its original activation by default (as adapt.py trains)
    distances: bool = True  # keeps the original model's streams after the SAE for a batch: turn off to save memory
    # steering (Sec. 5.2)
    steering_pos: str | None = None  # jsonl of {"text": ...}: texts the latent should make likelier
    steering_neg: str | None = None  # test negatives
    steering_neg_val: str | None = None  # validation negatives for tuning alpha
    latent: int | None = None
    alphas: str = "0,1,2,4,8,16,32"  # the grid alpha is tuned on
    alpha: float | None = None  # a fixed alpha (no tuning)
    steering_splice: bool = False  # steer the SAE reconstruction instead of the plain stream
    # benchmarks (Sec. 5.3): local .jsonl / .json / .parquet files or hub dataset ids
    mmlu: str | None = None
    hellaswag: str | None = None
    truthfulqa: str | None = None
    truthfulqa_preset: bool = True  # lm-eval's six-question QA prompt before each question
    bench_limit: int | None = None  # at most this many questions per benchmark
    bench_batch: int = 16  # sequences per forward pass (benchmarks and steering)
    plots: bool = True
    saebench: bool = False  # SAEBench metrics (Table 6) for the first SAE, base vs adapted: saebench.py
    autocast: str = "bfloat16"  # "float32" disables autocast
    dtype: str = "float32"  # storage of the model weights
    chunk: int = 2048  # tokens per lm_head + log-softmax chunk
    device: str = "auto"


# ----------------------------------------------------------------------------------------------------------------------
# Small helpers


class Progress:
    """A line with rate and ETA at most every `every` seconds, and one at the end."""

    def __init__(self, total: int, what: str, every: float = 10.0):
        self.total, self.what, self.every, self.done = total, what, every, 0
        self.t0 = self.last = time.time()

    def step(self, n: int = 1):
        self.done += n
        now = time.time()
        if now - self.last >= self.every or self.done == self.total:
            self.last, el = now, now - self.t0
            eta = el / self.done * (self.total - self.done)
            print(f"{self.what}: {self.done}/{self.total} ({el:.0f}s, ETA {eta:.0f}s)", flush=True)


def mean_ci(x) -> dict:
    """Mean and 90% normal-approximation CI over independent units."""
    x = np.asarray(x, dtype=np.float64)
    se = x.std(ddof=1) / math.sqrt(len(x)) if len(x) > 1 else float("nan")
    m = float(x.mean()) if len(x) else float("nan")
    return {"mean": m, "lo": m - Z90 * se, "hi": m + Z90 * se, "n": len(x)}


def _jsonable(o):
    if isinstance(o, dict):
        return {k: _jsonable(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [_jsonable(v) for v in o]
    if isinstance(o, (np.floating, float)):
        return float(o) if math.isfinite(o) else None  # NaN (an undefined ratio) is written as null
    if isinstance(o, np.integer):
        return int(o)
    return o


def _write(path: str, text: str):
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path + ".tmp", "w") as f:
        f.write(text)
    os.replace(path + ".tmp", path)


def forward(model, idx, saes, bos_id, splice_bos, watch=None):
    """Final residual stream with `saes` spliced. watch(layer, x_in, x_out), if given, sees the stream after every
    block: x_in before the splice, x_out after (the same tensor where no SAE sits)."""
    splice = splice_hooks(saes, idx, bos_id, splice_bos) if saes else {}

    def make(layer):
        def hook(x):
            y = splice[layer](x) if layer in splice else x
            if watch is not None:
                watch(layer, x, y)
            return y
        return hook
    layers = range(model.cfg.n_layer) if watch is not None else splice
    return model.blocks(model.embed(idx), hooks={layer: make(layer) for layer in layers})


# ----------------------------------------------------------------------------------------------------------------------
# Core table (Sec. 4), per-token breakdown (Sec. 6.1), activation distances (Sec. 6.2)


class SAEStats:
    """FVU, L0 and latent usage of one SAE over the tokens it reads."""

    def __init__(self, sae):
        self.sae, self.n, self.err, self.sq, self.l0 = sae, 0, 0.0, 0.0, 0.0
        self.sum = torch.zeros(sae.d_in, dtype=torch.float64, device=sae.W_dec.device)
        self.fired = torch.zeros(sae.d_sae, dtype=torch.bool, device=sae.W_dec.device)

    def update(self, x):  # (N, d_in)
        if not len(x):
            return
        xd = x.double()
        self.err += (xd - self.sae(x).double()).pow(2).sum().item()
        self.sum += xd.sum(0)
        self.sq += xd.pow(2).sum().item()
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
                "dead": dead, "dead_frac": dead / self.sae.d_sae, "tokens": self.n}


@torch.no_grad()
def core_eval(model, saes, batches, bos_id, cfg: EvalConfig, amp, adapted: bool, label: str = "") -> dict:
    first, n_layer = saes[0][0], model.cfg.n_layer
    settings = SETTINGS if adapted else SETTINGS[:2]
    sums = {s: {"ce": 0.0, "kl": 0.0} for s in settings}
    by_layer = {layer: i for i, (layer, _) in enumerate(saes)}
    stats = {s: [SAEStats(sae) for _, sae in saes] for s in (("original", "lora") if adapted else ("original",))}
    spliced = [s for s in settings if "sae" in s]
    seq = {s: {layer: {"cos": [], "l2": []} for layer in range(first, n_layer)} for s in spliced}
    token_ce = {s: [] for s in spliced}
    n_tok, prog = 0, Progress(len(batches), f"core{label}")
    for idx in batches:
        keep = torch.ones_like(idx, dtype=torch.bool) if cfg.splice_bos else idx != bos_id  # tokens the SAE replaces
        w = keep.float()
        acts = {}

        def watch_stats(setting):
            def watch(layer, x, _):
                if layer in by_layer:
                    stats[setting][by_layer[layer]].update(x[keep])
                if setting == "original" and cfg.distances and layer >= first:
                    acts[layer] = x
            return watch

        def watch_distance(setting):
            def watch(layer, _, y):
                if layer >= first:
                    a, b = acts[layer].float(), y.float()
                    for name, v in (("cos", F.cosine_similarity(a, b, dim=-1)), ("l2", (a - b).norm(dim=-1))):
                        seq[setting][layer][name].append(((v * w).sum(1) / w.sum(1).clamp_min(1)).cpu().numpy())
            return watch

        finals = {}
        dist = cfg.distances
        with amp, adapters_disabled(model):
            finals["original"] = forward(model, idx, [], bos_id, cfg.splice_bos, watch_stats("original"))
            finals["sae"] = forward(model, idx, saes, bos_id, cfg.splice_bos, watch_distance("sae") if dist else None)
        if adapted:
            with amp, merged(model):
                finals["lora"] = forward(model, idx, [], bos_id, cfg.splice_bos, watch_stats("lora"))
                finals["sae_lora"] = forward(model, idx, saes, bos_id, cfg.splice_bos,
                                             watch_distance("sae_lora") if dist else None)
        acts.clear()
        # per-token CE and KL(p_orig || p_setting), the vocabulary projection a chunk of tokens at a time
        targets = idx[:, 1:].reshape(-1)
        flat = {s: h[:, :-1].reshape(-1, h.shape[-1]) for s, h in finals.items()}
        parts = {s: [] for s in spliced}
        for c in range(0, len(targets), cfg.chunk):
            t = targets[c:c + cfg.chunk, None]
            with amp:
                logp0 = F.log_softmax(model.head(flat["original"][c:c + cfg.chunk]).float(), dim=-1)
                p0 = logp0.exp()
                for s in settings:
                    logp = logp0 if s == "original" else F.log_softmax(model.head(flat[s][c:c + cfg.chunk]).float(), -1)
                    ce = -logp.gather(1, t)[:, 0]
                    sums[s]["ce"] += ce.sum().item()
                    sums[s]["kl"] += (p0 * (logp0 - logp)).sum().item()
                    if s in parts:
                        parts[s].append(ce.cpu().numpy())
        for s in spliced:
            token_ce[s].append(np.concatenate(parts[s]))
        n_tok += len(targets)
        prog.step()

    res = {"tokens": n_tok, "settings": {s: {k: v / n_tok for k, v in sums[s].items()} for s in settings}}
    ce = {s: res["settings"][s]["ce"] for s in settings}
    res["gap"] = ce["sae"] - ce["original"]
    if adapted:
        res["gap_closed"] = gap_closed(dict(ce_base=ce["original"], ce_sae=ce["sae"],
                                            ce_sae_lora=ce["sae_lora"]))["gap_closed"]
        res["per_token"] = token_breakdown(np.concatenate(token_ce["sae"]), np.concatenate(token_ce["sae_lora"]))
    res["sae_stats"] = [dict(layer=layer, arch=sae.arch, d_sae=sae.d_sae, **stats["original"][i].result())
                        for i, (layer, sae) in enumerate(saes)]
    if adapted:
        for i, r in enumerate(res["sae_stats"]):
            r.update({f"{k}_lora": v for k, v in stats["lora"][i].result().items() if k != "tokens"})
    if cfg.distances:
        res["distances"] = distance_summary(seq, first)
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
    return {"tokens": n, "improved": int(imp.sum()), "degraded": int(deg.sum()),
            "unchanged": int(n - imp.sum() - deg.sum()), "share_improved": imp.mean(), "share_degraded": deg.mean(),
            "share_unchanged": 1 - imp.mean() - deg.mean(), "mean_change": d.mean(),
            "nats_improved": -d[imp].sum(), "nats_degraded": d[deg].sum(), "unchanged_tol": UNCHANGED_TOL,
            "quantiles": dict(zip((f"p{p}" for p in q), np.percentile(d, q).tolist())) if n else {},
            "bin_edges": edges.tolist(), "hist_improved": hist(-d[imp]).tolist(),
            "hist_degraded": hist(d[deg]).tolist(),
            "nats_improved_per_bin": hist(-d[imp], -d[imp]).tolist(),
            "nats_degraded_per_bin": hist(d[deg], d[deg]).tolist()}


def distance_summary(seq: dict, first: int) -> dict:
    out = {"first_layer": first, "ci": "90% normal approximation over sequences", "layers": []}
    for layer in seq["sae"]:
        row = {"layer": layer, "after_sae": layer - first}
        for name in ("cos", "l2"):
            base = np.concatenate(seq["sae"][layer][name])
            row[f"{name}_sae"] = mean_ci(base)
            if "sae_lora" in seq:
                lora = np.concatenate(seq["sae_lora"][layer][name])
                row[f"{name}_sae_lora"] = mean_ci(lora)
                row[f"{name}_change"] = mean_ci(lora - base)  # paired by sequence
        out["layers"].append(row)
    return out


# ----------------------------------------------------------------------------------------------------------------------
# Scoring token sequences (steering and benchmarks)


@torch.no_grad()
def score(model, seqs, queries, hooks_for, amp, batch_size: int, chunk: int, what: str = "") -> list[np.ndarray]:
    """For each sequence (token ids, BOS first) the log-probabilities log p(tok | seq[:pos + 1]) of its queries
    [(pos, tok), ...]. Sequences are batched by length and padded on the right, which a causal model never sees."""
    order = sorted(range(len(seqs)), key=lambda i: len(seqs[i]))
    out, dev = [None] * len(seqs), model.model.embed_tokens.weight.device
    pad = model.cfg.bos_token_id or 0
    prog = Progress(math.ceil(len(seqs) / batch_size), what) if what else None
    for b in range(0, len(order), batch_size):
        rows = order[b:b + batch_size]
        idx = torch.full((len(rows), max(len(seqs[i]) for i in rows)), pad, dtype=torch.long)
        for r, i in enumerate(rows):
            idx[r, :len(seqs[i])] = torch.tensor(seqs[i])
        idx = idx.to(dev)
        r_of = torch.tensor([r for r, i in enumerate(rows) for _ in queries[i]], device=dev)
        pos = torch.tensor([p for i in rows for p, _ in queries[i]], dtype=torch.long, device=dev)
        tok = torch.tensor([t for i in rows for _, t in queries[i]], dtype=torch.long, device=dev)
        with amp:
            h = model.blocks(model.embed(idx), hooks=hooks_for(idx))[r_of, pos]  # only the rows that are scored
            lp = torch.cat([F.log_softmax(model.head(h[c:c + chunk]).float(), -1).gather(1, tok[c:c + chunk, None])
                            for c in range(0, len(tok), chunk)])[:, 0]
        lp, k = lp.cpu().double().numpy(), 0
        for i in rows:
            out[i], k = lp[k:k + len(queries[i])], k + len(queries[i])
        if prog:
            prog.step()
    return out


def spliced(saes, bos_id, splice_bos):
    return lambda idx: splice_hooks(saes, idx, bos_id, splice_bos) if saes else {}


def setting_context(model, setting: str):
    return merged(model) if "lora" in setting else adapters_disabled(model)


# ----------------------------------------------------------------------------------------------------------------------
# Steering (Sec. 5.2, Eq. 8)


def read_texts(path: str, what: str) -> list[str]:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{what} {path}: no such file")
    texts = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError:
                raise ValueError(f"{path}:{n}: not valid JSON (expected one {{\"text\": ...}} per line)") from None
            text = obj.get("text") if isinstance(obj, dict) else obj
            if not isinstance(text, str) or not text.strip():
                raise ValueError(f"{path}:{n}: expected a JSON object with a non-empty 'text' string")
            texts.append(text)
    if len(texts) < 2:  # the 0..100 normalisation needs a spread of likelihoods
        raise ValueError(f"{what} {path}: {len(texts)} texts; steering needs at least 2")
    return texts


def steer_hook(v: torch.Tensor, alpha: float, inner=None):
    def hook(x):
        x = inner(x) if inner is not None else x
        vv = v.to(x.dtype)
        return x + alpha * (x @ vv)[..., None] * vv  # Eq. 8
    return hook


def steering_eval(model, seqs: dict, saes, v, layer, bos_id, cfg, amp, setting: str) -> dict:
    """Mean next-token log-likelihood of every text set unsteered and steered, alpha tuned (or fixed), for one model
    (setting "original": adapters off; "lora": adapters merged)."""
    queries = {k: [[(p - 1, s[p]) for p in range(1, len(s))] for s in ss] for k, ss in seqs.items()}

    def loglik(name, alpha):
        def hooks_for(idx):
            hooks = splice_hooks(saes, idx, bos_id, cfg.splice_bos) if cfg.steering_splice else {}
            if alpha is not None:
                hooks[layer] = steer_hook(v, alpha, hooks.get(layer))
            return hooks
        lps = score(model, seqs[name], queries[name], hooks_for, amp, cfg.bench_batch, cfg.chunk)
        return np.array([lp.mean() for lp in lps])

    def change(name, base, alpha):  # normalised steered - normalised unsteered (Pres et al.'s 0..100 scale)
        lo, hi = base.min(), base.max()
        return 100 * (loglik(name, alpha) - base) / (hi - lo if hi > lo else 1.0)

    grid = [cfg.alpha] if cfg.alpha is not None else [float(a) for a in cfg.alphas.split(",")]
    prog = Progress(len(grid) + 1, f"steering [{setting}]: unsteered, then alphas")
    with setting_context(model, setting):
        base = {name: loglik(name, None) for name in seqs}
        tuning, best = [], None
        prog.step()
        for a in grid:  # the paper's tuning rule: raise the positives, not the validation negatives
            pos = change("pos", base["pos"], a)
            val = change("neg_val", base["neg_val"], a) if "neg_val" in seqs else np.zeros(1)
            tuning.append({"alpha": a, "pos": pos.mean(), "neg_val": val.mean(), "objective": pos.mean() - val.mean()})
            if best is None or tuning[-1]["objective"] > best[0]:
                best = (tuning[-1]["objective"], a, pos)
            prog.step()
        res = {"alpha": best[1], "tuning": tuning, "pos": best[2].tolist(), "loglik_unsteered": {
            k: b.tolist() for k, b in base.items()}}
        if "neg" in seqs:
            res["neg"] = change("neg", base["neg"], best[1]).tolist()
    for k in ("pos", "neg"):
        if k in res:
            res[f"{k}_mean"] = float(np.mean(res[k]))
    return res


def steering_compare(base: dict, lora: dict) -> dict:
    """POSITIVE and NEGATIVE of Table 4: per-text change (LoRA model) - change (base model), 90% CI."""
    out = {}
    for k in ("pos", "neg"):
        if k in base:
            out["POSITIVE" if k == "pos" else "NEGATIVE"] = mean_ci(np.array(lora[k]) - np.array(base[k]))
    return out


# ----------------------------------------------------------------------------------------------------------------------
# Multiple-choice benchmarks (Sec. 5.3): readers and prompts live in benchmarks.py


def bench_eval(model, prepared: dict, saes, bos_id, cfg, amp, setting: str) -> dict:
    out = {}
    hooks_for = spliced(saes if "sae" in setting else [], bos_id, cfg.splice_bos)
    with setting_context(model, setting):
        for bench, (qs, seqs, queries, slots) in prepared.items():
            lps = score(model, seqs, queries, hooks_for, amp, cfg.bench_batch, cfg.chunk, f"{bench} [{setting}]")
            lls = [[0.0] * len(q["choices"]) for q in qs]
            for lp, sl in zip(lps, slots):
                for v, (qi, ci) in zip(lp, sl):
                    lls[qi][ci] += v
            out[bench] = bench_scores(qs, lls)
    return out


# ----------------------------------------------------------------------------------------------------------------------
# Reports


def num(x, spec: str) -> str:
    return "-" if x is None else format(x, spec)  # None: an undefined number (NaN in the computation)


def fmt_ci(d, p=4) -> str:
    if not d or d["mean"] is None:
        return "-"
    ci = f" [{d['lo']:.{p}f}, {d['hi']:.{p}f}]" if d["lo"] is not None else ""
    return f"{d['mean']:.{p}f}{ci}"


def markdown(res: dict) -> str:
    L = [f"# Evaluation of `{res['model']}`", "",
         "SAEs: " + ", ".join(f"`{s['path']}` (layer {s['layer']}, {s['arch']}, {s['d_sae']} latents)"
                              for s in res["saes"]), ""]
    groups = res["groups"]
    if any("settings" in g for g in groups):
        n_sae = len(res["saes"])
        L += [f"## Held-out CE and KL to the original model ({groups[0]['tokens']:,} tokens; nats per token"
              f"{'; SAE rows are compound: all ' + str(n_sae) + ' SAEs spliced' if n_sae > 1 else ''})", "",
              "| adapter | setting | CE | KL | gap closed |", "| --- | --- | --- | --- | --- |"]
        for g in groups:
            for s, v in g["settings"].items():
                gc = num(g.get("gap_closed"), ".1%") if s == "sae_lora" else ""
                L.append(f"| {g['name']} | {NAMES[s]} | {v['ce']:.4f} | {v['kl']:.4f} | {gc} |")
        L += ["", "## SAE at its layer (original model's activations; LoRA model's in the last columns)", "",
              "| adapter | layer | arch | FVU | L0 | dead latents | FVU (LoRA) | L0 (LoRA) |",
              "| --- | --- | --- | --- | --- | --- | --- | --- |"]
        for g in groups:
            for s in g["sae_stats"]:
                L.append(f"| {g['name']} | {s['layer']} | {s['arch']} | {num(s['fvu'], '.4f')} | {s['l0']:.1f} | "
                         f"{s['dead']} ({s['dead_frac']:.1%}) | {num(s.get('fvu_lora'), '.4f')} | "
                         f"{num(s.get('l0_lora'), '.1f')} |")
    if any("per_token" in g for g in groups):
        L += ["", "## Per-token change CE(SAE + LoRA) - CE(SAE)", "",
              "| adapter | tokens | improved | degraded | unchanged | mean change | nats gained | nats lost |",
              "| --- | --- | --- | --- | --- | --- | --- | --- |"]
        for g in groups:
            if "per_token" in g:
                p = g["per_token"]
                L.append(f"| {g['name']} | {p['tokens']:,} | {p['share_improved']:.1%} | {p['share_degraded']:.1%} | "
                         f"{p['share_unchanged']:.1%} | {p['mean_change']:+.4f} | {p['nats_improved']:.1f} | "
                         f"{p['nats_degraded']:.1f} |")
    if any("distances" in g for g in groups):
        L += ["", "## Distance to the original model's activations (90% CI over sequences)", "",
              "| adapter | layer (after SAE) | cos SAE | cos SAE + LoRA | L2 SAE | L2 SAE + LoRA |",
              "| --- | --- | --- | --- | --- | --- |"]
        for g in groups:
            for r in g.get("distances", {}).get("layers", []):
                L.append(f"| {g['name']} | {r['layer']} (+{r['after_sae']}) | {fmt_ci(r['cos_sae'])} | "
                         f"{fmt_ci(r.get('cos_sae_lora'))} | {fmt_ci(r['l2_sae'], 3)} | "
                         f"{fmt_ci(r.get('l2_sae_lora'), 3)} |")
    if "steering" in res:
        st = res["steering"]
        L += ["", f"## Steering latent {st['latent']} at layer {st['layer']} (change in normalised log-likelihood, "
              f"0..100 scale)", "", "| model | alpha | positive | negative | POSITIVE (LoRA - base) | NEGATIVE |",
              "| --- | --- | --- | --- | --- | --- |"]
        b = st["base"]
        L.append(f"| base | {b['alpha']:g} | {b['pos_mean']:+.2f} | {num(b.get('neg_mean'), '+.2f')} | | |")
        for g in groups:
            if "steering" in g:
                s, c = g["steering"], g["steering_compare"]
                L.append(f"| {g['name']} | {s['alpha']:g} | {s['pos_mean']:+.2f} | {num(s.get('neg_mean'), '+.2f')}"
                         f" | {fmt_ci(c.get('POSITIVE'), 2)} | {fmt_ci(c.get('NEGATIVE'), 2)} |")
    if "benchmarks" in res:
        L += ["", "## Benchmarks (accuracy % +- standard error)", "",
              "| adapter | benchmark | metric | n | SAE | SAE + LoRA | Original | LoRA |",
              "| --- | --- | --- | --- | --- | --- | --- | --- |"]
        shared = res["benchmarks"]
        for g in groups:
            for bench in shared["original"]:
                metric = "acc_norm" if bench == "hellaswag" else "acc"
                def cell(d):
                    return f"{100 * d[metric]:.1f} +- {num(d[metric + '_se'] and 100 * d[metric + '_se'], '.1f')}"
                row = {s: cell(shared[s][bench]) for s in ("original", "sae")}
                row.update({s: cell(g["benchmarks"][s][bench]) for s in ("sae_lora", "lora") if s in g["benchmarks"]})
                L.append(f"| {g['name']} | {bench} | {metric} | {shared['original'][bench]['n']} | {row['sae']} | "
                         f"{row.get('sae_lora', '-')} | {row['original']} | {row.get('lora', '-')} |")
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
        fig.savefig(path + ".tmp.png", dpi=150, bbox_inches="tight")
        os.replace(path + ".tmp.png", path)
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
            fig, axes = plt.subplots(1, 2, figsize=(8, 3))
            for ax, k in zip(axes, ("pos", "neg")):
                if k in g["steering"]:
                    ax.hist(res["steering"]["base"][k], bins=40, alpha=0.5, color="blue", label="base model")
                    ax.hist(g["steering"][k], bins=40, alpha=0.5, color="green", label="LoRA model")
                    ax.set_title("positive" if k == "pos" else "negative"), ax.legend()
                    ax.set_xlabel("change in normalised LL after steering")
            save(fig, f"steering_{i}.png")
    return written


# ----------------------------------------------------------------------------------------------------------------------


def main(argv=None) -> dict:
    cfg = common.parse_args(EvalConfig, argv)
    if cfg.model is None:
        embedded_defaults(cfg)
    if not cfg.sae:
        raise ValueError("no --sae given: eval.py measures a model with an SAE spliced in")
    steering = cfg.steering_pos is not None or cfg.steering_neg is not None or cfg.steering_neg_val is not None
    benches = {b: getattr(cfg, b) for b in ("mmlu", "hellaswag", "truthfulqa") if getattr(cfg, b)}
    if not (cfg.data or steering or benches):
        raise ValueError("nothing to evaluate: give --data (held-out tokens), --steering-pos, or a benchmark file")
    # -- read every input before any model work: bad files fail in a second, not after an hour -----------------------
    texts = {}
    if steering:
        if cfg.steering_pos is None or cfg.latent is None:
            raise ValueError("steering needs --steering-pos (texts) and --latent (the SAE latent to steer with)")
        if cfg.alpha is None and cfg.steering_neg_val is None and len(cfg.alphas.split(",")) > 1:
            raise ValueError("tuning alpha needs --steering-neg-val (validation negatives); or pass --alpha")
        for key, path in (("pos", cfg.steering_pos), ("neg", cfg.steering_neg), ("neg_val", cfg.steering_neg_val)):
            if path is not None:
                texts[key] = read_texts(path, f"--steering-{key.replace('_', '-')}")
    rows = {b: read_rows(src, b) for b, src in benches.items()}
    bench_qs = {b: questions(r[:cfg.bench_limit] if cfg.bench_limit else r, where, b, cfg.truthfulqa_preset)
                for b, (r, where) in rows.items()}

    run = common.setup(cfg.device)
    amp = common.autocast(run.device, cfg.autocast)
    dtype = getattr(torch, cfg.dtype)
    model = Transformer.from_pretrained(cfg.model, dtype=dtype, device=run.device).requires_grad_(False)
    layers = cfg.layer.split(",") if cfg.layer else [None] * len(cfg.sae)
    if len(layers) != len(cfg.sae):
        raise ValueError(f"--layer names {len(layers)} layers for {len(cfg.sae)} SAEs")
    loaded = sorted(((*load_saes([p], layer, model, run.device)[0], p) for p, layer in zip(cfg.sae, layers)),
                    key=lambda t: t[0])  # by layer, each with its path
    if len({layer for layer, _, _ in loaded}) < len(loaded):
        raise ValueError("two SAEs at the same layer")
    saes = [(layer, sae) for layer, sae, _ in loaded]
    for adapter in cfg.adapter:
        check_adapter(model, adapter)
    bos_id = model.cfg.bos_token_id
    seq_len = min(cfg.seq_len, model.cfg.max_seq_len)
    batches = load_batches(cfg, model, seq_len, run.device) if cfg.data else []
    tok = None
    if texts or bench_qs:
        from data import load_tokenizer
        tok = load_tokenizer(cfg.tokenizer or cfg.model)
        if (bos_id is not None and tok.bos_id != bos_id) or tok.vocab_size > model.cfg.vocab_size:
            raise ValueError(f"tokenizer {tok.path} (bos {tok.bos_id}, {tok.vocab_size} tokens) does not belong to the "
                             f"model (bos {bos_id}, {model.cfg.vocab_size} tokens): pass --tokenizer")
    prepared = {b: (qs, *bench_sequences(qs, tok, model.cfg.max_seq_len)) for b, qs in bench_qs.items()}
    if steering:
        s_layer, s_sae = saes[0]
        if not 0 <= cfg.latent < s_sae.d_sae:
            raise ValueError(f"--latent {cfg.latent} is out of range: the SAE at layer {s_layer} has {s_sae.d_sae}")
        v = s_sae.W_dec[cfg.latent].detach().float()
        v = v / v.norm().clamp_min(1e-12)
        seqs = {k: [([bos_id] + tok.encode(t))[:model.cfg.max_seq_len] for t in ts] for k, ts in texts.items()}

    res = {"model": cfg.model, "config": asdict(cfg), "device": str(run.device),
           "saes": [dict(path=p, layer=layer, arch=s.arch, d_sae=s.d_sae) for layer, s, p in loaded],
           "groups": []}
    if bench_qs:  # adapter-independent settings: computed once
        res["benchmarks"] = {s: bench_eval(model, prepared, saes, bos_id, cfg, amp, s) for s in ("original", "sae")}
    if steering:
        res["steering"] = {"latent": cfg.latent, "layer": s_layer, "splice": cfg.steering_splice,
                           "base": steering_eval(model, seqs, saes, v, s_layer, bos_id, cfg, amp, "original")}
    names = [os.path.basename(os.path.normpath(a)) for a in cfg.adapter]
    names = names if len(set(names)) == len(names) else list(cfg.adapter)  # e.g. several runs' ".../adapter"
    for gi, adapter in enumerate(cfg.adapter or [None]):
        if gi > 0:  # a fresh model per adapter: adapters of other ranks / layers cannot share LoRA modules
            del model
            model = Transformer.from_pretrained(cfg.model, dtype=dtype, device=run.device).requires_grad_(False)
        g = {"adapter": adapter, "name": names[gi] if adapter else "(none)"}
        if adapter:
            load_adapter(model, adapter)
            model.requires_grad_(False)
            print(f"adapter {adapter}", flush=True)
        if batches:
            g.update(core_eval(model, saes, batches, bos_id, cfg, amp, adapter is not None, f" [{g['name']}]"))
        if adapter and bench_qs:
            g["benchmarks"] = {s: bench_eval(model, prepared, saes, bos_id, cfg, amp, s) for s in ("sae_lora", "lora")}
        if adapter and steering:
            g["steering"] = steering_eval(model, seqs, saes, v, s_layer, bos_id, cfg, amp, "lora")
            g["steering_compare"] = steering_compare(res["steering"]["base"], g["steering"])
        res["groups"].append(g)
    if cfg.saebench:  # on the last adapter's model (Table 6 compares one adapter with the base model)
        import saebench
        res["saebench"] = saebench.evaluate(model, saes, cfg, run.device, amp)

    os.makedirs(cfg.out, exist_ok=True)
    _write(os.path.join(cfg.out, "eval.json"), json.dumps(_jsonable(res), indent=1))
    md = markdown(_jsonable(res)) + ("\n" + res["saebench"]["markdown"] if cfg.saebench else "")
    _write(os.path.join(cfg.out, "eval.md"), md)
    res["plots"] = plots(_jsonable(res), cfg.out) if cfg.plots else []
    print(md)
    print(f"wrote {os.path.join(cfg.out, 'eval.json')}, eval.md" + (f" and {len(res['plots'])} plots" if res["plots"]
                                                                   else ""))
    return res


def check_adapter(model, folder: str):
    """Every adapter matches the model, checked from the file headers before any evaluation starts (load_adapter checks
    again, but only when its turn comes)."""
    from safetensors import safe_open
    from lora import CONFIG_NAME, PREFIX, WEIGHTS_NAME
    path = os.path.join(folder, WEIGHTS_NAME)
    if not (os.path.isfile(os.path.join(folder, CONFIG_NAME)) and os.path.isfile(path)):
        raise FileNotFoundError(f"--adapter {folder}: no {CONFIG_NAME} + {WEIGHTS_NAME} (not a PEFT adapter folder)")
    with safe_open(path, "pt") as f:
        for key in f.keys():
            name, ab = key.removeprefix(PREFIX).rsplit(".lora_", 1)
            try:
                lin = model.get_submodule(name)
            except AttributeError:
                lin = None
            shape = f.get_slice(key).get_shape()
            got, want = (shape[1], getattr(lin, "in_features", None)) if ab.startswith("A") else \
                (shape[0], getattr(lin, "out_features", None))
            if got != want:
                raise ValueError(f"--adapter {folder}: tensor {key} (shape {tuple(shape)}) does not fit this model's "
                                 f"{name} (adapter for another model?)")


def load_batches(cfg: EvalConfig, model, seq_len: int, device) -> list[torch.Tensor]:
    from data import TokenLoader, load_meta
    meta = load_meta(cfg.data)
    if meta["vocab_size"] > model.cfg.vocab_size or (model.cfg.bos_token_id is not None and
                                                      meta["bos_id"] != model.cfg.bos_token_id):
        raise ValueError(f"{cfg.data}: tokenized with {meta['vocab_size']} tokens / bos {meta['bos_id']}, the model "
                         f"has {model.cfg.vocab_size} / bos {model.cfg.bos_token_id} (dataset for another model?)")
    loader = TokenLoader(cfg.data, "val", cfg.batch_size, seq_len, shuffle=False, device=device)
    batch = min(cfg.batch_size, loader.n_windows)  # never repeat a window to fill a batch
    if batch < cfg.batch_size:
        loader = TokenLoader(cfg.data, "val", batch, seq_len, shuffle=False, device=device)
    n = max(1, min(cfg.eval_tokens // (batch * seq_len), loader.n_windows // batch))
    if n * batch * seq_len < cfg.eval_tokens:
        print(f"{cfg.data}: the val split holds {n * batch * seq_len:,} tokens in whole batches; evaluating on those")
    return [loader.next_batch() for _ in range(n)]


def embedded_defaults(cfg: EvalConfig):
    """The offline pipeline's model, corpus, SAE and (if adapt.py has run) adapter. Building them takes minutes, which a
    test must never trigger by forgetting --model: under pytest this path refuses."""
    if "PYTEST_CURRENT_TEST" in os.environ:
        raise RuntimeError("eval.py without --model builds the embedded pipeline (minutes); tests must pass --model")
    import data
    import pretrain
    import train_sae
    cache = data.default_cache_dir()
    cfg.data = cfg.data or data.embedded_dataset(cache)[0]
    cfg.model = pretrain.ensure_tiny_model(cache)
    cfg.sae = cfg.sae or [train_sae.ensure_tiny_sae(cfg.model, cfg.data, cache)]
    if not cfg.adapter and os.path.isfile(os.path.join("out", "adapt-tiny", "adapter", "adapter_config.json")):
        cfg.adapter = [os.path.join("out", "adapt-tiny", "adapter")]
    if cfg.seq_len == EvalConfig.seq_len and cfg.eval_tokens == EvalConfig.eval_tokens:
        cfg.seq_len, cfg.batch_size, cfg.eval_tokens = 256, 8, 65_536  # the tiny model's context; a minute on CPU


if __name__ == "__main__":
    try:
        main()
    except (ValueError, FileNotFoundError, ImportError) as e:  # bad input or a missing optional package: one line
        sys.exit(f"error: {e}")
