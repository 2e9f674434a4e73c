"""
Labelled text for saebench.py: SAEBench's hub datasets for real runs, and tasks built from the embedded corpus offline.

Hub (real runs; SAEBench's `sae_bench_utils/dataset_utils.py` and `evals/scr_and_tpp/dataset_creation.py`): files are
fetched with huggingface_hub and read as parquet (needs pyarrow, the only optional package here) or jsonl:
    bias_in_bios (LabHC/bias_in_bios: profession x gender), amazon (canrager/amazon_reviews_mcauley_1and5: category x
    rating), ag_news (fancyzhx/ag_news), europarl (Helsinki-NLP/europarl, one language per class), github
    (codeparrot/github-code, one programming language per class). Rows are sampled as SAEBench samples them: pandas'
    `df.sample(n, random_state=seed)` is `RandomState(seed).choice(len, n, replace=False)` over the same row order,
    and the SCR quadrants are the first rows of each (profession, gender) cell, shuffled with default_rng(seed).
    A local folder / file (.parquet or .jsonl with the same columns) can stand in for a hub id.

Offline (the embedded pipeline; every label is a fact about the Python standard library source, nothing invented):
    package  - which stdlib package a snippet comes from (email, asyncio, xml, multiprocessing, importlib): TPP and
               sparse probing, 5 classes like SAEBench's 5-class subsets. Snippets are ~`chars` characters of a file.
    kind     - what a snippet of a file is: code (lines with comments and docstrings removed), docstring text, or
               comment text (from the tokenize module / ast): sparse probing, 3 classes.
    scr      - SAEBench's SCR layout with column1 = package (email vs asyncio, ...) playing profession and column2 =
               kind (docstring vs code) playing gender: the spurious probe is trained on email-docstrings vs
               asyncio-code only, so it can lean on either concept.
    first-letter (absorption) - the tokenizer's own vocabulary: tokens that are letters only (optionally one leading
               space), labelled by their first letter, as SAEBench's `get_alpha_tokens`.
Offline train and test snippets are disjoint text (each (package, kind) pool is shuffled and cut 80/20).
Then a run's inputs (tasks, token sets, core batches) and the cached activations its probes read.
"""
from __future__ import annotations

import ast
import fnmatch
import io
import json
import math
import os
import random
import sysconfig
import tokenize

import numpy as np
import torch

# SAEBench's class subsets (sae_bench_utils/dataset_info.py): bias_in_bios professions, amazon categories (ids)
HUB = {  # name: (repo, config folder or None, text column, label column, second column for SCR)
    "bias_in_bios": ("LabHC/bias_in_bios", None, "hard_text", "profession", "gender"),
    "amazon": ("canrager/amazon_reviews_mcauley_1and5", None, "text", "category", "rating"),
    "amazon_sentiment": ("canrager/amazon_reviews_mcauley_1and5", None, "text", "rating", None),
    "ag_news": ("fancyzhx/ag_news", None, "text", "label", None),
    "europarl": ("Helsinki-NLP/europarl", None, "translation", None, None),
    "github": ("codeparrot/github-code", None, "code", "language", None),
}
CLASSES = {"bias_in_bios_class_set1": ["0", "1", "2", "6", "9"], "bias_in_bios_class_set2": ["11", "13", "14", "18", "19"],
           "bias_in_bios_class_set3": ["20", "21", "22", "25", "26"], "amazon": ["1", "2", "3", "5", "6"],
           "amazon_sentiment": ["1.0", "5.0"], "github": ["C", "Python", "HTML", "Java", "PHP"],
           "ag_news": ["0", "1", "2", "3"], "europarl": ["en", "fr", "de", "es", "nl"]}
EUROPARL_PAIRS = {"en": "en-fr", "fr": "fr-it", "de": "de-en", "es": "es-fr", "nl": "nl-pt"}  # as SAEBench reads them
SCR_PAIRS = {"bias_in_bios": [(21, 13), (1, 11), (25, 22), (2, 26)],  # professor/nurse, architect/journalist, ...
             "amazon": [(24, 26), (30, 6), (18, 11), (3, 1)]}  # Books/CDs, Software/Electronics, ...
SCR_COLUMN2 = {"bias_in_bios": (0, 1), "amazon": (1.0, 5.0)}  # (male, female), (1-star, 5-star)
SCR_KEYS = {"male / female": "female_data_only", "professor / nurse": "nurse_data_only",
            "male_professor / female_nurse": "female_nurse_data_only"}  # SAEBench's PAIRED_CLASS_KEYS
STDLIB_PACKAGES = ["email", "asyncio", "xml", "multiprocessing", "idlelib"]


# ---------------------------------------------------------------------------------------------------------------------
# Hub readers


def read_table(source: str, split: str = "train", max_files: int | None = None) -> list[dict]:
    """Rows of a hub dataset (repo id) or local .parquet / .jsonl file or folder, for one split."""
    if os.path.exists(source):
        files = [source] if os.path.isfile(source) else sorted(
            os.path.join(d, f) for d, _, fs in os.walk(source) for f in fs if f.endswith((".parquet", ".jsonl")))
        files = [f for f in files if split in os.path.basename(f) or os.path.isfile(source)]
    else:
        from huggingface_hub import HfApi, hf_hub_download
        names = [f for f in HfApi().list_repo_files(source, repo_type="dataset")
                 if f.endswith((".parquet", ".jsonl")) and (fnmatch.fnmatch(os.path.basename(f), f"{split}*")
                                                           or f"/{split}/" in f or f"{split}-" in f)]
        files = [hf_hub_download(source, f, repo_type="dataset") for f in sorted(names)[:max_files]]
    if not files:
        raise FileNotFoundError(f"{source}: no {split} .parquet / .jsonl files")
    rows = []
    for f in files:
        if f.endswith(".jsonl"):
            with open(f, encoding="utf-8") as fh:
                rows += [json.loads(line) for line in fh if line.strip()]
            continue
        try:
            import pyarrow.parquet as pq
        except ImportError:
            raise ModuleNotFoundError(f"{f} is parquet: reading it needs pyarrow (pip install pyarrow), or give a .jsonl") from None
        rows += pq.read_table(f).to_pylist()
    return rows


def _sample(rows, n, seed):  # pandas df.sample(n, random_state=seed) on the same row order
    if len(rows) < n:
        raise ValueError(f"need {n} rows of a class, the dataset has {len(rows)}")
    return [rows[i] for i in np.random.RandomState(seed).choice(len(rows), n, replace=False)]


def hub_task(name: str, train_size: int = 4000, test_size: int = 1000, seed: int = 42, source: str | None = None):
    """SAEBench's sparse-probing / TPP data: ({class: [text]} train, {class: [text]} test)."""
    base = name.split("_class_set")[0]
    repo, _, text, label, col2 = HUB[base]
    classes = CLASSES[name]
    out = []
    for split, size in (("train", train_size), ("test", test_size)):
        if base == "europarl":  # SAEBench streams each language pair's train split and splits it itself
            break
        rows = read_table(source or repo, split, max_files=4 if base == "github" else None)
        data = {}
        for c in classes:
            cell = [r for r in rows if str(r[label]) == c]
            if base in ("bias_in_bios", "amazon"):  # balanced over the second column, size // 4 per cell
                groups = sorted({r[col2] for r in cell})
                data[c] = [r[text] for g in groups for r in _sample([r for r in cell if r[col2] == g], size // 4, seed)]
            elif base == "github":  # skip the licence header (SAEBench: 50 tokens ~ 150 characters)
                data[c] = [r[text][150:] for r in cell if len(r[text]) > 128 * 3 + 150][:size // 2]
            else:
                data[c] = [r[text] for r in _sample(cell, size // 2, seed)]
        out.append(data)
    if base == "europarl":
        rng = random.Random(seed)
        train, test = {}, {}
        for lang in classes:
            rows = read_table(source, "train") if source else _europarl_rows(EUROPARL_PAIRS[lang])
            texts = [r["translation"][lang] for r in rows][:train_size // 2 + test_size // 2 + 1]
            rng.shuffle(texts)
            train[lang], test[lang] = texts[:train_size // 2], texts[train_size // 2:train_size // 2 + test_size // 2]
        return train, test
    return out[0], out[1]


def _europarl_rows(pair: str):
    from huggingface_hub import HfApi, hf_hub_download
    files = sorted(f for f in HfApi().list_repo_files("Helsinki-NLP/europarl", repo_type="dataset")
                   if f.startswith(pair + "/") and f.endswith(".parquet"))
    if not files:
        raise FileNotFoundError(f"Helsinki-NLP/europarl: no parquet files for {pair}")
    return read_table(hf_hub_download("Helsinki-NLP/europarl", files[0], repo_type="dataset"))


def scr_quadrants(q: dict, n: int, seed: int) -> dict[str, list[str]]:
    """SAEBench's get_spurious_corr_data from the four cells q[(c1 in (pos, neg), c2 in (pos, neg))] (lists of text in
    dataset order), n = size // 4. Keys as SAEBench names them (gender / profession stand for column 2 / column 1)."""
    pp, pn, np_, nn = q[1, 1], q[1, 0], q[0, 1], q[0, 0]  # (column1 positive?, column2 positive?)
    if min(len(pp), len(pn), len(np_), len(nn)) < n or min(len(pp), len(nn)) < 2 * n:
        raise ValueError(f"an SCR cell holds fewer than the {n} (or {2 * n}) texts needed")
    out = {"male / female": pp[:n] + np_[:n], "female_data_only": pn[:n] + nn[:n],
           "professor / nurse": pp[:n] + pn[:n], "nurse_data_only": np_[:n] + nn[:n],
           "male_professor / female_nurse": pp[:2 * n], "female_nurse_data_only": nn[:2 * n]}
    rng = np.random.default_rng(seed)
    for key in out:  # SAEBench shuffles in this order (its pos_pos / neg_neg lists last)
        rng.shuffle(out[key])
    return out


def hub_scr(name: str, pair: tuple, train_size: int = 4000, test_size: int = 1000, seed: int = 42, source=None):
    repo, _, text, c1, c2 = HUB[name]
    out = []
    for split, size in (("train", train_size), ("test", test_size)):
        rows = read_table(source or repo, split)
        v2 = SCR_COLUMN2[name]
        q = {(a, b): [r[text] for r in rows if r[c1] == pair[1 - a] and r[c2] == v2[1 - b]] for a in (0, 1) for b in (0, 1)}
        out.append(scr_quadrants(q, size // 4, seed))
    return out[0], out[1]


# ---------------------------------------------------------------------------------------------------------------------
# Offline tasks from the standard library


def _pieces(src: str) -> dict[str, list[str]]:
    """A file's code lines (comments and docstrings removed), docstrings and comments, each in source order."""
    comments, strings = [], set()
    try:
        for t in tokenize.generate_tokens(io.StringIO(src).readline):
            if t.type == tokenize.COMMENT and len(t.string) > 2:
                comments.append(t.string.lstrip("#").strip())
        for node in ast.walk(ast.parse(src)):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and node.body:
                first = node.body[0]
                if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant) and isinstance(first.value.value, str):
                    strings.add((first.lineno, first.end_lineno))
    except (SyntaxError, tokenize.TokenError, ValueError):
        return {"code": [], "docstring": [], "comment": []}
    lines = src.splitlines()
    in_doc = set(i for a, b in strings for i in range(a - 1, b))
    code = [ln.split("#")[0].rstrip() for i, ln in enumerate(lines) if i not in in_doc and ln.strip()
            and not ln.strip().startswith("#")]
    docs = [" ".join(lines[a - 1:b]).strip().strip("rbu").strip("'\"").strip() for a, b in sorted(strings)]
    return {"code": [c for c in code if c.strip()], "docstring": [d for d in docs if d], "comment": comments}


def _snippets(parts: list[str], chars: int, sep: str) -> list[str]:
    out, cur = [], ""
    for p in parts:
        cur = cur + sep + p if cur else p
        if len(cur) >= chars:
            out.append(cur[:chars])
            cur = ""
    return out


def stdlib_snippets(chars: int = 400) -> dict:
    """{(package, kind): [snippet]} over STDLIB_PACKAGES; kind: code / docstring / comment (half-length snippets, these
    are short) or file (consecutive raw text of a file)."""
    from formats.corpus import read_text, stdlib_files
    root = sysconfig.get_paths()["stdlib"]
    out = {}
    for path in stdlib_files():
        rel = os.path.relpath(path, root).split(os.sep)
        src = read_text(path) if len(rel) > 1 and rel[0] in STDLIB_PACKAGES else None
        if not src:
            continue
        kinds, short = _pieces(src), chars // 2
        kinds = {"code": _snippets(kinds["code"], short, "\n"), "docstring": _snippets(kinds["docstring"], short, " "),
                 "comment": _snippets(kinds["comment"], short, " "),
                 "file": [src[i:i + chars] for i in range(0, len(src) - chars + 1, chars)]}
        for kind, snips in kinds.items():
            out.setdefault((rel[0], kind), []).extend(snips)
    return out


def _take(texts: list[str], n: int, rng: random.Random, what: str) -> list[str]:
    if len(texts) < n:
        raise ValueError(f"offline task: only {len(texts)} snippets for {what}, {n} asked (lower the task sizes)")
    return rng.sample(texts, n)


def offline_tasks(train: int, test: int, seed: int = 42, chars: int = 400) -> dict:
    """{'package': (train, test), 'kind': (train, test), 'scr': [((a, b), train, test) per package pair]}, shaped as
    the hub tasks: texts per class (SCR: per SAEBench key). Each (package, kind) list of snippets is shuffled and cut
    80/20 into train / test, so test texts never occur in training."""
    rng = random.Random(seed)
    split = {}
    for key, snips in sorted(stdlib_snippets(chars).items()):
        snips = rng.sample(snips, len(snips))
        cut = len(snips) * 4 // 5
        split[key + ("train",)], split[key + ("test",)] = snips[:cut], snips[cut:]
    tasks = {}
    for name, classes, pick in (("package", STDLIB_PACKAGES, lambda c, s: split[c, "file", s]),
                                ("kind", ["code", "docstring", "comment"],
                                 lambda c, s: sum((split[p, c, s] for p in STDLIB_PACKAGES), []))):
        tasks[name] = tuple({c: _take(pick(c, s), n, rng, f"{name} {c} ({s})") for c in classes}
                            for s, n in (("train", train), ("test", test)))
    tasks["scr"] = []
    for a, b in (("email", "asyncio"), ("xml", "idlelib")):  # column1 pairs; column2 = docstring vs code
        pair = []
        for s, n in (("train", train), ("test", test)):
            q = {(x, y): split[pkg, kind, s] for x, pkg in ((1, a), (0, b)) for y, kind in ((1, "docstring"), (0, "code"))}
            m = min(n // 2, *(len(v) for v in q.values()), min(len(q[1, 1]), len(q[0, 0])) // 2)
            if m < 8:
                raise ValueError(f"offline SCR task {a}/{b}: too few docstring snippets ({m} per cell)")
            pair.append(scr_quadrants(q, m, seed))
        tasks["scr"].append(((a, b), *pair))
    return tasks


def alpha_tokens(tok) -> list[tuple[int, str]]:
    """(id, text) of every vocabulary token made of ASCII letters only, one leading space allowed (SAEBench's
    get_alpha_tokens)."""
    letters = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ")
    out = []
    for i in range(tok.vocab_size):
        if tok.kind == "sentencepiece":
            if tok.sp.is_control(i) or tok.sp.is_unknown(i) or tok.sp.is_byte(i):
                continue
            s = tok.sp.id_to_piece(i).replace("\u2581", " ")
        else:
            try:
                s = tok.enc.decode_single_token_bytes(i).decode("utf-8")
            except (KeyError, UnicodeDecodeError):
                continue
        w = s[1:] if s.startswith(" ") else s
        if w and all(c in letters for c in w):
            out.append((i, s))
    return out


LETTERS = "abcdefghijklmnopqrstuvwxyz"


def first_letter_prompts(tok, seed, n_icl=10, template="{word} has the first letter:", max_words=None):
    """SAEBench's create_dataset_probe_training on the tokenizer's letter-only tokens: (train, test) lists of
    (token ids with BOS, letter index); prompts whose word token does not survive tokenisation intact are dropped.
    max_words: the first max_words of the shuffled vocabulary only (a CPU's budget: a 49k-token BPE has ~47k such
    tokens, ~4M prompt tokens per model setting); None: all of them, as SAEBench."""
    vocab = dict((s, i) for i, s in alpha_tokens(tok))
    rng = random.Random(seed)
    words = rng.sample(sorted(vocab), len(vocab))[:max_words]
    cut = int(len(words) * 0.8)
    pos = -len(tok.encode(template.replace("{word}", ""))) - 1  # the word token (SAEBench: -6 for Gemma)
    out = []
    for part in (words[:cut], words[cut:]):
        rows = []
        for w in part:
            ex = rng.sample(part, min(n_icl, len(part) - 1))
            while w in ex:
                ex = rng.sample(part, len(ex))
            lines = [template.format(word=e) + " " + e.strip()[0].upper() for e in ex]
            ids = [tok.bos_id] + tok.encode("\n" + "\n".join(lines) + "\n" + template.format(word=w))
            if ids[pos] == vocab[w]:
                rows.append((ids, LETTERS.index(w.strip()[0].lower())))
        out.append(rows)
    return out[0], out[1], pos


# ----------------------------------------------------------------------------------------------------------------------
# A run's inputs: its tasks, their texts tokenized once, the core metrics' token batches

SIZES = {"offline": (300, 75), "hub": (4000, 1000)}  # probe train / test texts (offline: per class; hub: SAEBench's)


def tasks(offline: bool, seed: int) -> tuple[dict, dict, dict]:
    """(sparse probing, TPP, SCR) tasks, each {name: (train, test)} of {class: [text]} (SCR: per SAEBench key)."""
    tr, te = SIZES["offline" if offline else "hub"]
    if offline:
        t = offline_tasks(tr, te, seed)
        probing = {"stdlib_package": t["package"], "stdlib_kind": t["kind"]}
        return probing, {"stdlib_package": t["package"]}, {f"stdlib_{a}_{b}": (x, y) for (a, b), x, y in t["scr"]}
    probing = {n: hub_task(n, tr, te, seed) for n in CLASSES}
    return (probing, {n: probing[n] for n in ("bias_in_bios_class_set1", "amazon")},
            {f"{n}_{a}_{b}": hub_scr(n, (a, b), tr, te, seed) for n in SCR_PAIRS for a, b in SCR_PAIRS[n]})


def token_sets(tok, kinds: dict) -> dict:
    """Every text set once: (kind, task, split, class) -> token ids, BOS + the first 127 tokens (SAEBench's contexts
    of 128)."""
    return {(kind, name, split, c): [[tok.bos_id] + tok.encode(t)[:127] for t in texts]
            for kind, named in kinds.items() for name, splits in named.items()
            for split, data in zip(("train", "test"), splits) for c, texts in data.items()}


def core_batches(data_dir: str | None, device, n: int = 32) -> list[torch.Tensor]:
    """The core metrics' tokens: up to n batches of 8 held-out windows of 128 tokens (SAEBench core's context)."""
    if not data_dir:
        return []
    from data import TokenLoader
    loader = TokenLoader(data_dir, "val", 8, 128, shuffle=False, device=device)
    return [loader.next_batch() for _ in range(min(n, loader.n_windows // 8))]


# ----------------------------------------------------------------------------------------------------------------------
# Cached activations: every text read once per model setting; the probes train on these


def _batches(seqs, batch, pad, device):
    for i in range(0, len(seqs), batch):
        part = seqs[i:i + batch]
        idx = torch.full((len(part), max(map(len, part))), pad, dtype=torch.long)
        for j, s in enumerate(part):  # right padding: a causal model's earlier positions never see it
            idx[j, :len(s)] = torch.tensor(s)
        yield i, idx.to(device), torch.tensor([len(s) for s in part], device=device)


def latents(sae, x):
    """The SAE's codes in fp32 (what every probe reads)."""
    return sae.encode(x).float()


@torch.no_grad()
def pooled(model, sae, layer, seqs, specials, autocast_ctx, batch=32) -> torch.Tensor:
    """(N, d_model + d_sae) float32 on CPU: residual after block `layer` and its SAE latents, each averaged over the
    non-special tokens of a sequence (SAEBench's create_meaned_model_activations / get_sae_meaned_activations)."""
    dev = next(model.parameters()).device
    out = torch.zeros(len(seqs), model.cfg.d_model + sae.d_sae)
    for i, idx, lens in _batches(seqs, batch, specials[0], dev):
        keep = (torch.arange(idx.shape[1], device=dev)[None] < lens[:, None]) & ~torch.isin(idx, specials.to(dev))
        with autocast_ctx:
            x = model(idx, stop_at=layer)
        x, w = x.float(), keep.float()[..., None]
        n = w.sum(1).clamp_min(1)
        out[i:i + len(idx)] = torch.cat([(x * w).sum(1) / n, (latents(sae, x) * w).sum(1) / n], 1).cpu()
    return out


@torch.no_grad()
def word_acts(model, sae, layer, seqs, pos, autocast_ctx, batch=64):
    """Residual and latents at position len + pos (pos < 0) of each sequence."""
    dev = next(model.parameters()).device
    xs = []
    for _, idx, lens in _batches(seqs, batch, 0, dev):
        with autocast_ctx:
            x = model(idx, stop_at=layer)
        xs.append(x[torch.arange(len(idx), device=dev), lens + pos].float())
    x = torch.cat(xs)
    return x.cpu(), latents(sae, x).cpu()


def task_features(feats: dict, group: str, name: str, task: tuple, cols=slice(None)) -> tuple[dict, dict]:
    """A task's cached features, keyed as token_sets keys them, as (train, test) {class: features[:, cols]}."""
    return tuple({c: feats[group, name, split, c][:, cols] for c in classes}
                 for split, classes in zip(("train", "test"), task))


def probe_data(acts: dict, cls: str, scr: bool = False):
    """Positives of `cls` vs as many negatives (SCR: its paired key; else sampled evenly from the other classes), in
    SAEBench's order of RNG calls (probe_training.py)."""
    pos, n = acts[cls], len(acts[cls])
    if scr:
        neg = acts[SCR_KEYS.get(cls) or {v: k for k, v in SCR_KEYS.items()}[cls]]
    else:
        others = [k for k in acts if k != cls]
        per = math.ceil(n / len(others))
        neg = torch.cat([acts[k][torch.randperm(len(acts[k]))[:per]] for k in others])
    neg = neg[torch.randperm(len(neg))[:n]]
    x = torch.cat([pos, neg])
    y = torch.zeros(len(x), dtype=torch.int)
    y[:n] = 1
    perm = torch.randperm(len(x))
    return x[perm], y[perm]
