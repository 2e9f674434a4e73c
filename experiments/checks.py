"""
Functional-check inputs built from the corpus: for steering (paper Sec. 5.2) and multiple choice (Sec. 5.3) on a model
of Python source, everything is taken from the held-out documents of a token folder (data.prepare's val split, the
embedded stdlib corpus by default), never from the training documents. At the tiny model's scale (a 3M-parameter
model of Python source) these check that the pipeline works end to end with inputs that make sense for that model;
they are not the paper's experiments.

    python experiments/checks.py --out out/exp/checks/inputs    # what `python experiments/run.py checks` runs first

- The latent (the paper steers with latents about one concept, e.g. "Donald Trump"): each candidate construct (every
  Python keyword, `self`, string literals, comments, numbers; their spans from Python's own tokenizer) against each
  SAE latent on the held-out tokens: precision = P(token in the construct | latent active), recall = P(latent active
  | token in the construct). The pair with the highest F1 is taken (ties: the first construct in CONSTRUCTS, then the
  lowest latent); every number of the choice is recorded.
- Steering texts (steering.read_inputs' jsonl): positives are snippets of `lines` consecutive held-out lines that
  hold the construct; negatives hold none of it and come in kinds, as the paper's negatives come from several
  datasets: code, comment lines, docstring lines. Validation negatives (alpha tuning) are an equal mix of the kinds
  (the paper tunes on one of its datasets, medical facts; here no kind is left without test texts); each kind's test
  negatives are a file of their own. Snippets with the construct are taken first (it may be rare); no two texts
  share a line.
- Multiple choice in the HellaSwag format (multiple_choice.read_rows): the context is held-out lines and the first
  word of the next line, the true ending is the rest of that line, the three others are line rests from other held-out
  documents of similar length, distinct, drawn with `seed`. Only rows that lm-eval's HellaSwag preprocessing leaves
  unchanged are kept (it strips, collapses double spaces, drops bracketed text), so that the model reads the source
  as written: that keeps unindented code and text.
- No text that occurs verbatim in a training document is kept (the stdlib repeats itself: licence headers, generated
  codecs), so held-out means unseen text, not only another file.
"""
from __future__ import annotations

import ast
import io
import json
import keyword
import os
import random
import sys
import tokenize
from dataclasses import asdict, dataclass

import numpy as np
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from plumbing import common  # noqa: E402
from evals import confidence  # noqa: E402
from formats import disk  # noqa: E402
from evals import multiple_choice  # noqa: E402
from formats.corpus import split_documents  # noqa: E402

CONSTRUCTS = tuple(keyword.kwlist) + ("self", "string", "comment", "number")
KINDS = ("code", "comment", "docstring")  # the negative datasets
CHOICES = 4  # HellaSwag's endings per question (chance: 1 / CHOICES)
MIN_SET = 10  # fewest texts in a steering test set


@dataclass
class ChecksConfig:
    """Build functional-check inputs from held-out documents: a construct and its SAE latent, steering texts,
    multiple-choice rows."""
    model: str | None = None  # HF folder; none: the embedded tiny model
    sae: str | None = None  # SAE folder; none: the embedded tiny model's SAE at --layer
    layer: int | None = None  # the SAE layer; none: what the SAE files say
    data: str | None = None  # token folder (data.prepare, layout bos_chunks, local source); none: the embedded corpus
    out: str = "out/checks"  # inputs.json (the choice, every number of it) and the jsonl files go here
    select_tokens: int = 100_000  # held-out tokens the latent is chosen on
    seq_len: int = 1024  # tokens per window the latent is chosen on (at most the model's context; attention's cost
    # grows with its square, so a real model's 8k context is not used whole)
    autocast: str = "float32"  # precision of the activations the latent is chosen on: float32 | auto (bfloat16 where
    # the hardware runs it natively) | bfloat16
    min_support: int = 50  # constructs on fewer held-out tokens than this are not candidates
    lines: int = 3  # lines per steering snippet
    n_pos: int = 200  # steering positives
    n_neg: int = 100  # steering test negatives per kind (a kind with fewer than 10 is left out)
    n_val: int = 60  # steering validation negatives, an equal mix of the kinds
    n_mc: int = 400  # multiple-choice questions
    context_lines: int = 6  # at most this many lines before the line a question completes
    seed: int = 0  # snippet, question and ending draws


# ----------------------------------------------------------------------------------------------------------------------
# Constructs: where each lies in a document (Python's tokenizer and ast)


def construct_spans(doc: str) -> dict[str, list[tuple[int, int]]] | None:
    """Character spans of each construct in `doc` (None if Python's tokenizer rejects it)."""
    starts = np.cumsum([0] + [len(x) + 1 for x in doc.split("\n")])
    spans = {c: [] for c in CONSTRUCTS}
    try:
        for t in tokenize.generate_tokens(io.StringIO(doc).readline):
            name = ("string" if t.type == tokenize.STRING else "comment" if t.type == tokenize.COMMENT else
                    "number" if t.type == tokenize.NUMBER else
                    t.string if t.type == tokenize.NAME and t.string in spans else None)
            if name:
                spans[name].append((int(starts[t.start[0] - 1] + t.start[1]), int(starts[t.end[0] - 1] + t.end[1])))
    except (tokenize.TokenError, SyntaxError, ValueError):  # IndentationError is a SyntaxError
        return None
    return spans


def line_kinds(doc: str) -> list[str | None]:
    """Per line of doc.split("\\n"): "comment" (only a comment), "docstring" (inside a docstring, not on its quote
    lines), "code" (any other line outside multi-line strings) or None (blank, or inside another multi-line string)."""
    lines = doc.split("\n")
    kinds = [None if not x.strip() else "comment" if x.lstrip().startswith("#") else "code" for x in lines]
    for t in tokenize.generate_tokens(io.StringIO(doc).readline):
        if t.type == tokenize.STRING and t.end[0] > t.start[0]:
            for i in range(t.start[0] - 1, t.end[0]):
                kinds[i] = None
    for node in ast.walk(ast.parse(doc)):
        body = getattr(node, "body", None)
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and body and \
                isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant) and \
                isinstance(body[0].value.value, str):
            for i in range(body[0].lineno, body[0].end_lineno - 1):  # 0-based lines strictly inside the quotes
                kinds[i] = "docstring" if lines[i].strip() else None
    return kinds


def parsed(docs: list[str]) -> list[tuple[int, str, dict, list]]:
    """(index, doc, construct spans, line kinds) for every document Python parses."""
    out = []
    for i, doc in enumerate(docs):
        spans = construct_spans(doc)
        if spans is None:
            continue
        try:
            out.append((i, doc, spans, line_kinds(doc)))
        except (SyntaxError, ValueError, tokenize.TokenError):
            continue
    return out


# ----------------------------------------------------------------------------------------------------------------------
# The latent: which one fires on which construct


def token_spans(tok, ids: list[int], text: str) -> list[tuple[int, int]] | None:
    """Character span of each token of `text` (sentencepiece or tiktoken ids); None if the pieces do not spell
    `text` (a tokenizer that normalises)."""
    pieces = []
    for i in ids:
        if tok.kind == "sentencepiece":
            p = tok.sp.id_to_piece(i)
            pieces.append(bytes([int(p[3:5], 16)]) if tok.sp.is_byte(i) else p.replace("\u2581", " ").encode())
        else:
            pieces.append(tok.enc.decode_single_token_bytes(i))
    if b"".join(pieces) != text.encode():
        return None
    # a character starts at each byte that is not a UTF-8 continuation byte (0b10xxxxxx)
    ends = np.cumsum([sum(1 for x in b if x & 0xC0 != 0x80) for b in pieces]).tolist()
    return list(zip([0, *ends[:-1]], ends))


def token_labels(spans: list[tuple[int, int]], constructs: dict[str, list[tuple[int, int]]]) -> np.ndarray:
    """(tokens, len(CONSTRUCTS)) bool: the token's characters overlap a span of the construct."""
    lab = np.zeros((len(spans), len(CONSTRUCTS)), dtype=bool)
    starts, ends = np.array([s for s, _ in spans]), np.array([e for _, e in spans])
    for c, name in enumerate(CONSTRUCTS):
        for s, e in constructs[name]:
            lab[(starts < e) & (ends > s), c] = True
    return lab


def selection_windows(tok, docs: list[tuple], seq_len: int, max_tokens: int) -> tuple[list, list]:
    """Each parsed document's tokens in windows of BOS + seq_len - 1 tokens (as the bos_chunks training windows
    start), with their construct labels, until max_tokens."""
    windows, labels, n = [], [], 0
    for _, doc, spans, _ in docs:
        ids = tok.encode(doc)
        tspans = token_spans(tok, ids, doc)
        if tspans is None:
            continue
        lab = token_labels(tspans, spans)
        for s in range(0, len(ids), seq_len - 1):
            if n >= max_tokens:
                return windows, labels
            windows.append([tok.bos_id] + ids[s:s + seq_len - 1])
            labels.append(lab[s:s + seq_len - 1])
            n += len(windows[-1]) - 1
    return windows, labels


@torch.no_grad()
def activity_counts(acts_fn, sae, windows: list[list[int]], labels: list[np.ndarray], batch: int = 16) -> dict:
    """Over the windows' tokens after BOS: fires[j] = tokens latent j is active on, support[c] = tokens in construct c,
    both[j, c] = tokens in c that j is active on. acts_fn(idx) is the residual stream the SAE reads."""
    m, dev = sae.d_sae, sae.W_dec.device
    fires, both = torch.zeros(m, dtype=torch.float64), torch.zeros(m, len(CONSTRUCTS), dtype=torch.float64)
    support, n = np.zeros(len(CONSTRUCTS), dtype=np.int64), 0
    for b in range(0, len(windows), batch):
        ws = windows[b:b + batch]
        idx = torch.zeros(len(ws), max(map(len, ws)), dtype=torch.long)
        for r, w in enumerate(ws):
            idx[r, :len(w)] = torch.tensor(w)
        x = acts_fn(idx.to(dev))
        rows = torch.cat([x[r, 1:len(w)] for r, w in enumerate(ws)])  # BOS and padding left out
        active = (sae.encode(rows) != 0).double().cpu()
        lab = np.concatenate(labels[b:b + batch])
        fires += active.sum(0)
        both += active.T @ torch.from_numpy(lab).double()
        support += lab.sum(0)
        n += len(rows)
    return dict(fires=fires.numpy(), both=both.numpy(), support=support, tokens=n)


def pick_latent(counts: dict, min_support: int) -> dict:
    """The (construct, latent) pair of highest F1 among constructs on at least min_support tokens."""
    both, fires, support = counts["both"], counts["fires"], counts["support"]
    f1 = 2 * both / np.maximum(fires[:, None] + support[None, :], 1)
    f1[:, support < min_support] = -1
    if f1.max() <= 0:
        raise ValueError(f"no latent fires on a construct of at least {min_support} held-out tokens: lower "
                         f"--min-support or raise --select-tokens")
    c = int(np.argmax(f1.max(0)))  # the first construct of the best F1, then its lowest latent
    j = int(np.argmax(f1[:, c]))
    g = f1.copy()
    g[:, c] = -1  # the best pair of another construct: how clear the choice was
    c2 = int(np.argmax(g.max(0)))
    return dict(construct=CONSTRUCTS[c], latent=j, f1=float(f1[j, c]), precision=float(both[j, c] / fires[j]),
                recall=float(both[j, c] / support[c]), construct_tokens=int(support[c]), latent_fires=int(fires[j]),
                tokens=int(counts["tokens"]),
                runner_up=dict(construct=CONSTRUCTS[c2], latent=int(np.argmax(g[:, c2])), f1=float(g.max())))


# ----------------------------------------------------------------------------------------------------------------------
# Steering texts


def steering_sets(docs: list[tuple], construct: str, seen, *, lines: int, n_pos: int, n_neg: int, n_val: int,
                  seed: int) -> dict[str, list[str]]:
    """{"pos", "neg_val", "neg/<kind>"...}: snippets of `lines` consecutive non-blank lines, no two sharing a line.
    seen(text): the text occurs in a training document (then it is left out)."""
    pools = {k: [] for k in ("pos", *KINDS)}
    for _, doc, spans, kinds in docs:
        text_lines = doc.split("\n")
        starts = np.cumsum([0] + [len(x) + 1 for x in text_lines])
        has = np.zeros(len(text_lines), dtype=bool)
        for s, e in spans[construct]:  # the lines a span of the construct touches
            has[np.searchsorted(starts, s, "right") - 1:np.searchsorted(starts, e, "left")] = True
        used = np.zeros(len(text_lines), dtype=bool)
        for positive in (True, False):  # snippets with the construct first: it may be rare
            i = 0
            while i + lines <= len(text_lines):
                w, ks = slice(i, i + lines), kinds[i:i + lines]
                pool = None
                if not used[w].any() and all(x.strip() for x in text_lines[w]):
                    pool = ("pos" if has[w].any() else None) if positive else \
                        ks[0] if ks[0] and len(set(ks)) == 1 and not has[w].any() else None
                if pool:
                    pools[pool].append("\n".join(text_lines[w]))
                    used[w] = True
                    i += lines
                else:
                    i += 1
    rng, taken = random.Random(seed), set()
    for k in pools:
        pools[k] = sorted(set(pools[k]))
        rng.shuffle(pools[k])

    def draw(pool, n):
        got = []
        for t in pool:
            if len(got) == n:
                break
            if t not in taken and not seen(t):
                taken.add(t)
                got.append(t)
        return got
    out = {"pos": draw(pools["pos"], n_pos)}
    kinds = [k for k in KINDS if len(pools[k]) >= MIN_SET + n_val // len(KINDS)]
    if kinds:
        out["neg_val"] = [t for k in kinds for t in draw(pools[k], -(-n_val // len(kinds)))][:n_val]
    for k in kinds:
        test = draw(pools[k], n_neg)
        if len(test) >= MIN_SET:
            out[f"neg/{k}"] = test
    if len(out["pos"]) < 2 or len(out) < 3:
        raise ValueError(f"the held-out documents hold {len(pools['pos'])} snippets with {construct!r} and "
                         f"{', '.join(f'{len(pools[k])} {k}' for k in KINDS)} snippets without it: too few to steer")
    return out


# ----------------------------------------------------------------------------------------------------------------------
# Multiple choice


def unchanged(text: str) -> bool:
    """lm-eval's HellaSwag preprocessing (multiple_choice.questions) leaves `text` as it is, as context and ending."""
    q = multiple_choice.questions([{"ctx": text, "endings": [text, text], "label": 0}], "", "hellaswag")[0]
    return q["context"] == text and q["texts"][0] == text


def mc_rows(docs: list[tuple], seen, *, n: int, context_lines: int, seed: int) -> list[dict]:
    """HellaSwag rows {ctx, endings, label, doc}: ctx = up to context_lines lines + the first word of the next line,
    endings[label] = the rest of that line; each row read back unchanged by lm-eval's preprocessing. seen(text): the
    text occurs in a training document (then the question is left out)."""
    cands = {}  # document -> [(context, true ending)]
    for d, doc, _, _ in docs:
        text_lines = doc.split("\n")
        ok = [x == "" or unchanged(x) for x in text_lines]
        for t, line in enumerate(text_lines):
            first, _, rest = line.partition(" ")
            if not (line and ok[t] and first and len(rest) >= 3 and unchanged(rest)):
                continue
            s = t
            while s > max(0, t - context_lines) and ok[s - 1]:
                s -= 1
            ctx_lines = text_lines[s:t]
            while ctx_lines and not ctx_lines[0]:
                ctx_lines.pop(0)
            if ctx_lines:
                cands.setdefault(d, []).append(("\n".join(ctx_lines) + "\n" + first, rest))
    rng = random.Random(seed)
    endings = sorted({(e, d) for d, cs in cands.items() for _, e in cs})
    order = sorted(cands)
    for d in order:
        rng.shuffle(cands[d])
    rows, r, used = [], 0, set()
    while len(rows) < n and any(cands.values()):  # round robin over the documents: none dominates
        d = order[r % len(order)]
        r += 1
        if not cands[d]:
            continue
        ctx, gold = cands[d].pop()
        if (ctx, gold) in used or seen(ctx + " " + gold):
            continue
        used.add((ctx, gold))
        near = sorted({e for e, d2 in endings if d2 != d and e != gold and 0.7 <= len(e) / len(gold) <= 1.4})
        if len(near) < CHOICES - 1:
            continue
        ends = rng.sample(near, CHOICES - 1)
        label = rng.randrange(CHOICES)
        ends.insert(label, gold)
        row = {"ctx": ctx, "endings": ends, "label": label, "doc": d}
        q = multiple_choice.questions([row], "", "hellaswag")[0]
        if q["context"] == ctx and q["texts"] == ends:
            rows.append(row)
    if len(rows) < 2:
        raise ValueError(f"the held-out documents give {len(rows)} multiple-choice questions; need at least 2")
    return rows


# ----------------------------------------------------------------------------------------------------------------------
# Everything, into files


def build(cfg: ChecksConfig) -> dict:
    """Choose the latent, write the steering and multiple-choice files, and return (and write) inputs.json."""
    from plumbing import embedded
    from formats.tokenizer import load_tokenizer
    from model import Transformer
    from sae import SAE
    tiny = cfg.model is None
    model_dir = cfg.model or embedded.model()
    data_dir = cfg.data or (embedded.corpus() if tiny else embedded.corpus_for(model_dir))
    if cfg.sae is None and not tiny:
        raise ValueError("--model without --sae: pass the SAE folder whose latents to choose from")
    sae_dir = cfg.sae or embedded.sae(cfg.layer if cfg.layer is not None else embedded.SAE_LAYER)
    held_out, train = split_documents(data_dir, "the functional checks", train=True)
    tok = load_tokenizer(model_dir)
    meta = disk.read_json(os.path.join(data_dir, "meta.json"), f"{data_dir}: no meta.json")
    val = np.fromfile(os.path.join(data_dir, "val.bin"), dtype=meta["dtype"])
    if not np.array_equal(val, [t for d in held_out for t in tok.encode(d, bos=True, eos=True)]):
        raise ValueError(f"{data_dir}: its held-out documents, read again, do not tokenize to its val.bin (another "
                         f"Python's stdlib, or another tokenizer?): rebuild the folder with data.prepare")
    seen = "\n\x00".join(train).__contains__  # no match across two training documents
    docs = parsed(held_out)
    common.log(f"checks: {len(docs)} of {len(held_out)} held-out documents parse as Python; texts are checked "
               f"against {len(train)} training documents")

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = Transformer.from_pretrained(model_dir, device=device).requires_grad_(False)
    sae = SAE.from_pretrained(sae_dir, device=device).requires_grad_(False).eval()
    layer = cfg.layer if cfg.layer is not None else sae.layer
    if layer is None:
        raise ValueError(f"{sae_dir}: the SAE files do not say which layer it reads; pass --layer")
    sae.check_d_in(model.cfg.d_model, sae_dir)
    windows, labels = selection_windows(tok, docs, min(cfg.seq_len, model.cfg.max_seq_len), cfg.select_tokens)
    autocast_ctx = common.autocast(device, cfg.autocast)

    def acts(idx):
        with autocast_ctx:
            return model(idx, stop_at=layer).float()
    choice = pick_latent(activity_counts(acts, sae, windows, labels), cfg.min_support)
    common.log(f"checks: latent {choice['latent']} fires on {choice['construct']!r}: precision "
               f"{choice['precision']:.3f}, recall {choice['recall']:.3f} on {choice['tokens']:,} held-out tokens")

    sets = steering_sets(docs, choice["construct"], seen, lines=cfg.lines, n_pos=cfg.n_pos, n_neg=cfg.n_neg,
                         n_val=cfg.n_val, seed=cfg.seed)
    rows = mc_rows(docs, seen, n=cfg.n_mc, context_lines=cfg.context_lines, seed=cfg.seed)
    files = {}
    for name, texts in sets.items():
        files[name] = os.path.join(cfg.out, name.replace("/", "_") + ".jsonl")
        write_jsonl(files[name], [{"text": t} for t in texts])
    files["hellaswag"] = os.path.join(cfg.out, "mc.jsonl")
    write_jsonl(files["hellaswag"], rows)
    info = dict(model=model_dir, sae=sae_dir, layer=layer, data=data_dir, held_out_docs=len(held_out),
                parsed_docs=len(docs), choice=choice, files=files, texts={k: len(v) for k, v in sets.items()},
                mc_questions=len(rows), mc_chance=1 / CHOICES, config=asdict(cfg))
    disk.write_json(os.path.join(cfg.out, "inputs.json"), info)
    return info


# ----------------------------------------------------------------------------------------------------------------------
# The report: eval.py's numbers on these inputs


SETTINGS = (("sae", "SAE"), ("sae_lora", "SAE + LoRA"), ("original", "Original"), ("lora", "LoRA"))


def report(info: dict, ev: dict, n_params: int) -> tuple[dict, str]:
    """(results, markdown) from inputs.json and eval.py's eval.json (one adapter)."""
    g, c = ev["groups"][0], info["choice"]
    scale = (f"a functional check at this scale ({n_params / 1e6:.1f}M-parameter model of Python source), not the "
             f"paper's numbers")
    bench = {**{s: ev["benchmarks"][s] for s in ("original", "sae")}, **{s: g["benchmarks"][s] for s in
                                                                           ("sae_lora", "lora")}}
    steer = {}
    for key, compare, what in (("steering", "steering_compare", "ours"),
                               ("steering_authors", "steering_authors_compare", "authors")):
        b, lo, cmp = ev[key]["base"], g[key], g[compare]
        steer[what] = dict(alpha_base=b["alpha"], alpha_lora=lo["alpha"], pos_base=b["pos_mean"],
                           pos_lora=lo["pos_mean"], neg_base=b.get("neg_mean"), neg_lora=lo.get("neg_mean"),
                           POSITIVE=cmp.get("POSITIVE"), NEGATIVE=cmp.get("NEGATIVE"),
                           NEGATIVE_by_dataset=cmp.get("NEGATIVE_by_dataset"))
    core = {s: g["settings"][s]["ce"] for s in ("original", "sae", "sae_lora", "lora")}
    results = dict(choice=c, inputs={k: info[k] for k in ("texts", "mc_questions", "mc_chance", "files")},
                   core=dict(ce=core, gap_closed=g.get("gap_closed"), positions=g.get("positions")),
                   steering=steer, multiple_choice={s: {k: bench[s]["hellaswag"][k] for k in
                                                        ("acc", "acc_se", "acc_norm", "acc_norm_se", "n")}
                                                    for s, _ in SETTINGS},
                   truthfulqa_gen={s: {k: v for k, v in bench[s]["truthfulqa_gen"].items() if k != "completions"}
                                   for s, _ in SETTINGS},
                   scale=scale)
    ru = c["runner_up"]
    L = [f"# Steering and multiple choice: {scale}", "",
         f"Inputs from the {info['held_out_docs']} held-out documents of {_rel(info['data'])} (experiments/checks.py); "
         f"SAE at layer {info['layer']}: {_rel(info['sae'])}; CE on held-out tokens: original {core['original']:.4f}, "
         f"SAE {core['sae']:.4f}, SAE + LoRA {core['sae_lora']:.4f}, LoRA {core['lora']:.4f}.", "",
         f"## The latent: {scale}", "",
         "| construct | latent | precision | recall | F1 | construct tokens | latent fires | held-out tokens | "
         "runner-up |", "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
         f"| `{c['construct']}` | {c['latent']} | {c['precision']:.3f} | {c['recall']:.3f} | {c['f1']:.3f} | "
         f"{c['construct_tokens']:,} | {c['latent_fires']:,} | {c['tokens']:,} | `{ru['construct']}`, latent "
         f"{ru['latent']}: F1 {ru['f1']:.3f} |", "",
         f"## Steering with latent {c['latent']} (Sec. 5.2, Table 4): {scale}", "",
         f"Positives: {info['texts']['pos']} snippets with `{c['construct']}`; negatives without it, "
         + ", ".join(f"{k[4:]} {n}" for k, n in info["texts"].items() if k.startswith("neg/"))
         + f", validation (alpha tuning) {info['texts']['neg_val']}; alpha tuned over {ev['config']['alphas']}. "
           "Change in normalised log-likelihood (0..100) after steering; POSITIVE / NEGATIVE: LoRA model minus base "
           "model, mean [90% CI] (LoRA better at steering: POSITIVE > 0, NEGATIVE <= 0).", "",
         "| formulation | alpha base / LoRA | positive base / LoRA | negative base / LoRA | POSITIVE | NEGATIVE |",
         "| --- | --- | --- | --- | --- | --- |"]
    for what, r in steer.items():
        L.append(f"| {what} | {r['alpha_base']:g} / {r['alpha_lora']:g} | {r['pos_base']:+.2f} / "
                 f"{r['pos_lora']:+.2f} | {confidence.fmt_num(r['neg_base'], '+.2f')} / "
                 f"{confidence.fmt_num(r['neg_lora'], '+.2f')} | {confidence.fmt_ci(r['POSITIVE'], 2)} | "
                 f"{confidence.fmt_ci(r['NEGATIVE'], 2)} |")
    for k, ci in (steer["authors"]["NEGATIVE_by_dataset"] or {}).items():
        L.append(f"| authors, negatives {k} | | | | | {confidence.fmt_ci(ci, 2)} |")
    mc = results["multiple_choice"]
    L += ["", f"## Multiple choice from held-out code (Sec. 5.3, HellaSwag format): {scale}", "",
          f"{mc['original']['n']} questions: held-out lines and the first word of the next line; which of "
          f"{CHOICES} line rests is the true one. Chance {100 / CHOICES:.0f}%. Accuracy % +- standard error.", "",
          "| metric | " + " | ".join(n for _, n in SETTINGS) + " |", "| --- " * (len(SETTINGS) + 1) + "|"]
    for m in ("acc", "acc_norm"):
        L.append(f"| {m} | " + " | ".join(f"{100 * mc[s][m]:.1f} +- {100 * mc[s][m + '_se']:.1f}"
                                          for s, _ in SETTINGS) + " |")
    tq = results["truthfulqa_gen"]
    L += ["", f"## TruthfulQA generation, questions from held-out docstrings (--truthfulqa-gen corpus): {scale}", "",
          f"{tq['original']['n']} questions \"What does the Python function f do?\" (truthfulqa.corpus_rows); greedy "
          f"answers scored as lm-eval's truthfulqa_gen: % of questions whose answer is closer to a true answer (the "
          f"docstring's first line, or lm-eval's \"I have no comment.\") than to the first lines of three other "
          f"docstrings, +- standard error.", "",
          "| metric | " + " | ".join(n for _, n in SETTINGS) + " |", "| --- " * (len(SETTINGS) + 1) + "|"]
    for m in ("bleu_acc", "rouge1_acc", "rouge2_acc"):
        L.append(f"| {m} | " + " | ".join(f"{100 * tq[s][m]:.1f} +- {100 * tq[s][m + '_se']:.1f}"
                                          for s, _ in SETTINGS) + " |")
    return results, "\n".join(L)


def _rel(path: str) -> str:
    """A path inside the repository, relative to it (as the commands print it)."""
    return os.path.relpath(path, ROOT) if os.path.abspath(path).startswith(ROOT + os.sep) else path


def write_jsonl(path: str, rows: list[dict]):
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    disk.write_text(path, "".join(json.dumps(r) + "\n" for r in rows))


def main(argv=None) -> dict:
    cfg, _ = common.parse_args(ChecksConfig, argv)
    info = build(cfg)
    print(f"wrote {os.path.join(cfg.out, 'inputs.json')}: latent {info['choice']['latent']} on "
          f"{info['choice']['construct']!r}; steering texts {info['texts']}; {info['mc_questions']} questions")
    return info


if __name__ == "__main__":
    common.cli(main)
