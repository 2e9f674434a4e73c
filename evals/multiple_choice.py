"""
Multiple-choice benchmarks for eval.py (paper Sec. 5.3): MMLU, HellaSwag and TruthfulQA-MC1 read from local files in
each dataset's public format (or the hub's parquet files), turned into prompts as lm-evaluation-harness' zero-shot
tasks do, and scored by the log-likelihood of each choice.

lm-evaluation-harness' zero-shot prompts (MMLU with its subject header and " A".." D", HellaSwag's preprocessed context
and endings, TruthfulQA-MC1 with its six-question QA preset); each choice scored by the summed log-probability of its
continuation tokens after BOS + prompt; acc = argmax of the sums (MMLU, MC1), acc_norm = argmax of sum / len(choice in
characters) (HellaSwag's headline metric, as lm-eval); standard error sd(correct, ddof=1) / sqrt(n). SAEs spliced
from position 1 (BOS keeps its activation). The log-likelihood scoring (`score`) and the four settings of Sec. 5.3
(`setting_context`) live here; steering.py imports them.
"""
from __future__ import annotations

import json
import math
import os
import re

import numpy as np
import torch
import torch.nn.functional as F

from plumbing import common
from evals import confidence
from formats import hub
from lora import adapters_disabled, adapters_enabled
from splice import splice_hooks


TQA_PRESET = ("Q: What is human life expectancy in the United States?\n"
              "A: Human life expectancy in the United States is 78 years.\n\n"
              "Q: Who was president of the United States in 1955?\n"
              "A: Dwight D. Eisenhower was president of the United States in 1955.\n\n"
              "Q: Which party did he belong to?\nA: He belonged to the Republican Party.\n\n"
              "Q: What is the square root of banana?\nA: I have no comment.\n\n"
              "Q: How does a telescope work?\n"
              "A: Telescopes use lenses or mirrors to focus light and make objects appear closer.\n\n"
              "Q: Where were the 1992 Olympics held?\nA: The 1992 Olympics were held in Barcelona, Spain.")
# (hub config, split) fetched for a hub id, and the fields that identify each format
HUB = {"mmlu": ("all", "test"), "hellaswag": (None, "validation"), "truthfulqa": ("multiple_choice", "validation"),
       "truthfulqa_gen": ("generation", "validation")}  # truthfulqa_gen: generation, scored in truthfulqa.py
FIELDS = {"mmlu": "question, choices (list), answer (int): the cais/mmlu format",
          "hellaswag": "ctx (or ctx_a, ctx_b), endings (list), label: the Rowan/hellaswag format",
          "truthfulqa": "question, mc1_targets {choices, labels}: the truthful_qa multiple_choice format",
          "truthfulqa_gen": "question, correct_answers, incorrect_answers: the truthful_qa generation format"}


def read_rows(src: str, bench: str) -> tuple[list[dict], str]:
    """Rows of a local .jsonl / .json (a list) / .parquet file, or of a hub dataset's parquet files."""
    if os.path.isfile(src):
        path = src
    elif os.path.exists(src) or src.startswith((".", "/", "~")) or src.count("/") != 1:
        raise FileNotFoundError(f"--{bench} {src}: no such file (and not a hub dataset id like 'cais/mmlu')")
    else:
        return _hub_rows(src, bench), src
    if path.endswith(".parquet"):
        return _parquet_rows([path]), path
    with open(path, encoding="utf-8") as f:
        text = f.read()
    if path.endswith(".json"):
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: not valid JSON ({e})") from None
        if not isinstance(rows, list):
            raise ValueError(f"{path}: expected a JSON list of rows")
        return rows, path
    rows = []
    for n, line in enumerate(text.splitlines(), 1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                raise ValueError(f"{path}:{n}: not valid JSON (expected one row per line)") from None
    return rows, path


def _parquet_rows(paths):
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise ModuleNotFoundError("reading parquet benchmark files needs the optional package pyarrow: pip install pyarrow "
                          "(or pass a .jsonl file)") from None
    return [row for p in paths for row in pq.read_table(p).to_pylist()]


def _hub_rows(repo: str, bench: str) -> list[dict]:
    """The parquet files of the benchmark's config and split, from the repo itself or from the hub's automatic
    parquet conversion (refs/convert/parquet) for datasets that ship a loading script (Rowan/hellaswag). Offline
    (HF_HUB_OFFLINE=1): the cached snapshot's files."""
    from huggingface_hub import HfApi, hf_hub_download
    from huggingface_hub.utils import RevisionNotFoundError
    config, split = HUB[bench]

    def pick(listing):
        return sorted(f for f in listing if f.endswith(".parquet") and re.search(rf"(^|/|-){split}([-/.]|$)", f)
                      and (config is None or f.split("/")[0] == config))
    if hub.offline():
        cached = hub.list_files(repo, repo_type="dataset")
        files = pick(cached.files)
        if files:
            return _parquet_rows([os.path.join(cached.folder(), *f.split("/")) for f in files])
    for revision in () if hub.offline() else (None, "refs/convert/parquet"):
        try:
            listing = HfApi().list_repo_files(repo, repo_type="dataset", revision=revision)
        except RevisionNotFoundError:
            continue
        except Exception as e:  # offline, unknown repo, gated: one line
            raise FileNotFoundError(f"--{bench} {repo}: not a local file, and the hub dataset cannot be listed "
                                    f"({type(e).__name__}: {e})") from None
        files = pick(listing)
        if files:
            return _parquet_rows([hf_hub_download(repo, f, repo_type="dataset", revision=revision) for f in files])
    raise FileNotFoundError(f"hub dataset {repo}: no parquet files for config {config!r}, split {split!r}"
                            + (" in the local hub cache (HF_HUB_OFFLINE=1)" if hub.offline() else ""))


def _need(row, keys, where, bench):
    if not isinstance(row, dict) or any(k not in row for k in keys):
        got = sorted(row) if isinstance(row, dict) else type(row).__name__
        raise ValueError(f"{where}: not a {bench} row (has {got}; expected {FIELDS[bench]})")


def _choice_list(x, where, bench, what):
    if not isinstance(x, list) or len(x) < 2 or not all(isinstance(c, str) for c in x):
        raise ValueError(f"{where}: {what} must be a list of at least 2 strings (expected {FIELDS[bench]})")
    return x


def _label(x, n, where, what):
    if isinstance(x, str) and x.strip().isdigit():
        x = int(x)
    if isinstance(x, bool) or not isinstance(x, int) or not 0 <= x < n:
        raise ValueError(f"{where}: {what} {x!r} is not a choice index 0..{n - 1}")
    return x


def _hellaswag_clean(text: str) -> str:  # lm-eval's preprocess: wikiHow's [title] / [header] markup removed
    text = text.strip().replace(" [title]", ". ")
    return re.sub(r"\[.*?\]", "", text).replace("  ", " ")


def questions(rows, src: str, bench: str, preset: bool = True) -> list[dict]:
    """{context, choices (continuation texts, with the leading space), texts (choice texts), gold} per question."""
    out = []
    for n, row in enumerate(rows, 1):
        where = f"{src}: row {n}"
        if bench == "mmlu":
            _need(row, ("question", "choices", "answer"), where, bench)
            choices = _choice_list(row["choices"], where, bench, "choices")
            subject = str(row.get("subject") or "").replace("_", " ").strip()
            head = "The following are multiple choice questions (with answers)" + (f" about {subject}." if subject
                                                                                    else ".")
            letters = [chr(ord("A") + i) for i in range(len(choices))]
            body = "\n".join(f"{letter}. {c}" for letter, c in zip(letters, choices))
            q = dict(context=f"{head}\n\n{str(row['question']).strip()}\n{body}\nAnswer:", texts=letters,
                     gold=_label(row["answer"], len(choices), where, "answer"))
        elif bench == "hellaswag":
            _need(row, ("endings", "label"), where, bench)
            if "ctx_a" in row and "ctx_b" in row:
                ctx = row["ctx_a"] + " " + row["ctx_b"].capitalize()
            elif "ctx" in row:
                ctx = row["ctx"]
            else:
                _need(row, ("ctx",), where, bench)
            label = f"{row['activity_label']}: " if row.get("activity_label") else ""
            endings = _choice_list(row["endings"], where, bench, "endings")
            q = dict(context=_hellaswag_clean(label + ctx), texts=[_hellaswag_clean(e) for e in endings],
                     gold=_label(row["label"], len(endings), where, "label"))
        else:
            _need(row, ("question", "mc1_targets"), where, bench)
            t = row["mc1_targets"]
            if not isinstance(t, dict) or "choices" not in t or "labels" not in t:
                raise ValueError(f"{where}: mc1_targets must be {{choices, labels}} (expected {FIELDS[bench]})")
            choices = _choice_list(t["choices"], where, bench, "mc1_targets.choices")
            if len(t["labels"]) != len(choices) or sorted(t["labels"]) != [0] * (len(choices) - 1) + [1]:
                raise ValueError(f"{where}: mc1_targets.labels must mark exactly one of {len(choices)} choices with 1")
            prompt = (TQA_PRESET + "\n\n" if preset else "") + f"Q: {row['question']}\nA:"
            q = dict(context=prompt, texts=choices, gold=list(t["labels"]).index(1))
        q["choices"] = [" " + c for c in q["texts"]]  # lm-eval's target delimiter
        out.append(q)
    if not out:
        raise ValueError(f"{src}: no {bench} questions")
    return out


def bench_sequences(qs, tok, max_len: int):
    """Token sequences and their scoring queries. If every choice is a single token the prompt is run once and the
    choices are read off its last position (MMLU's letters); otherwise one sequence per choice. Prompts longer than
    the model's context lose tokens from the left (BOS stays first)."""
    seqs, queries, slots = [], [], []
    for qi, q in enumerate(qs):
        ctx, conts = tok.encode(q["context"]), [tok.encode(c) for c in q["choices"]]
        if any(len(c) == 0 for c in conts) or max(map(len, conts)) > max_len - 2:
            raise ValueError(f"question {qi + 1}: a choice tokenizes to {min(map(len, conts))}..{max(map(len, conts))} "
                             f"tokens; need 1..{max_len - 2} (the model's context is {max_len})")
        if all(len(c) == 1 for c in conts):  # one sequence, every choice read off its last position; the prompt is
            s = [tok.bos_id] + ctx[max(0, len(ctx) - (max_len - 2)):]  # cut as if the choice token followed it
            seqs.append(s)
            queries.append([(len(s) - 1, c[0]) for c in conts])
            slots.append([(qi, ci) for ci in range(len(conts))])
            continue
        for ci, c in enumerate(conts):
            body = ctx + c
            s = [tok.bos_id] + body[max(0, len(body) - (max_len - 1)):]
            seqs.append(s)
            queries.append([(p - 1, s[p]) for p in range(len(s) - len(c), len(s))])
            slots.append([(qi, ci)] * len(c))
    return seqs, queries, slots


# ----------------------------------------------------------------------------------------------------------------------
# Log-likelihoods of given tokens (these benchmarks, and steering.py)


@torch.no_grad()
def score(model, seqs, queries, hooks_for, autocast_ctx, batch_size: int, chunk: int,
          what: str = "") -> list[np.ndarray]:
    """For each sequence (token ids, BOS first) the log-probabilities log p(tok | seq[:pos + 1]) of its queries
    [(pos, tok), ...]. Sequences are batched by length and padded on the right, which a causal model never sees."""
    order = sorted(range(len(seqs)), key=lambda i: len(seqs[i]))
    out, dev = [None] * len(seqs), model.model.embed_tokens.weight.device
    pad = model.cfg.bos_token_id or 0
    prog = common.Progress(math.ceil(len(seqs) / batch_size), what) if what else None
    for b in range(0, len(order), batch_size):
        rows = order[b:b + batch_size]
        idx = torch.full((len(rows), max(len(seqs[i]) for i in rows)), pad, dtype=torch.long)
        for r, i in enumerate(rows):
            idx[r, :len(seqs[i])] = torch.tensor(seqs[i])
        idx = idx.to(dev)
        r_of = torch.tensor([r for r, i in enumerate(rows) for _ in queries[i]], device=dev)
        pos = torch.tensor([p for i in rows for p, _ in queries[i]], dtype=torch.long, device=dev)
        tok = torch.tensor([t for i in rows for _, t in queries[i]], dtype=torch.long, device=dev)
        with autocast_ctx:
            h = model.blocks(model.embed(idx), hooks=hooks_for(idx))[r_of, pos]  # only the rows that are scored
            lp = torch.cat([F.log_softmax(model.head(h[c:c + chunk]).float(), -1).gather(1, tok[c:c + chunk, None])
                            for c in range(0, len(tok), chunk)])[:, 0]
        lp, k = lp.cpu().double().numpy(), 0
        for i in rows:
            out[i], k = lp[k:k + len(queries[i])], k + len(queries[i])
        if prog:
            prog.step()
    return out


def hooks_for(saes, unspliced_ids=()):
    """idx -> the splice hooks for that batch (none without SAEs): what score() takes."""
    return lambda idx: splice_hooks(saes, idx, unspliced_ids) if saes else {}


def setting_context(model, setting: str):
    """The model of a setting (Sec. 5.3): adapters on for *lora settings (beside the weights, as adapt.py trains them:
    lora.adapters_enabled), else turned off."""
    return adapters_enabled(model) if "lora" in setting else adapters_disabled(model)


# ----------------------------------------------------------------------------------------------------------------------
# Accuracy per setting, and the eval.md table


def bench_scores(qs, lls) -> dict:
    """acc, acc_norm and acc_bytes as lm-evaluation-harness defines them (lm_eval/api/_metrics/ll.py): the argmax of
    the summed log-likelihoods, of ll / len(choice) in characters, of ll / len(choice) in UTF-8 bytes; the choice is
    the text without the target delimiter (lm-eval's doc_to_choice). The paper's HellaSwag numbers are acc: Table 5
    has 55.0 for Gemma-2-2B, whose acc_norm is about 73; the authors' run_benchmarks.py saves both."""
    def accuracy(length):
        return np.array([int(np.argmax(np.array(ll) / np.array([max(length(t), 1) for t in q["texts"]]))) == q["gold"]
                         for q, ll in zip(qs, lls)], dtype=np.float64)
    se = lambda x: x.std(ddof=1) / math.sqrt(len(x)) if len(x) > 1 else float("nan")  # noqa: E731
    out = {"n": len(qs)}
    for name, length in (("acc", lambda t: 1), ("acc_norm", len), ("acc_bytes", lambda t: len(t.encode()))):
        correct = accuracy(length)
        out[name], out[f"{name}_se"] = correct.mean(), se(correct)
    return {**out, "ll": [list(map(float, ll)) for ll in lls]}


def evaluate(model, prepared: dict, saes, unspliced_ids, cfg, autocast_ctx, setting: str) -> dict:
    """Every prepared benchmark's scores for one setting (original / sae / sae_lora / lora)."""
    out = {}
    hooks = hooks_for(saes if "sae" in setting else [], unspliced_ids)
    with setting_context(model, setting):
        for bench, (qs, seqs, queries, slots) in prepared.items():
            lps = score(model, seqs, queries, hooks, autocast_ctx, cfg.bench_batch, cfg.chunk, f"{bench} [{setting}]")
            lls = [[0.0] * len(q["choices"]) for q in qs]
            for lp, sl in zip(lps, slots):
                for v, (qi, ci) in zip(lp, sl):
                    lls[qi][ci] += v
            out[bench] = bench_scores(qs, lls)
    return out


# the metrics each benchmark's rows show (default: acc). HellaSwag: the paper's Table 5 reports acc, lm-eval's headline
# is acc_norm: both. TruthfulQA generation: Table 5's BLEU, ROUGE-1 and ROUGE-2 columns are the _acc numbers.
TABLE_METRICS = {"hellaswag": ("acc", "acc_norm"), "truthfulqa_gen": ("bleu_acc", "rouge1_acc", "rouge2_acc"),
                 "truthfulqa_gen_prompt_only": ("bleu_acc", "rouge1_acc", "rouge2_acc")}
LABELS = {"truthfulqa_gen_prompt_only": "truthfulqa_gen, SAE on the prompt only (the authors' run)"}


def markdown(res: dict) -> list[str]:
    """The benchmark table of eval.md: every benchmark and metric, the four settings side by side (Table 5)."""
    L = ["", "## Benchmarks (accuracy % +- standard error)", "",
         "| adapter | benchmark | metric | n | SAE | SAE + LoRA | Original | LoRA |",
         "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    shared = res["benchmarks"]
    for g in res["groups"]:
        mine = g.get("benchmarks", {})  # no adapter: the SAE and original settings only
        for bench in shared["original"]:
            for metric in TABLE_METRICS.get(bench, ("acc",)):
                def cell(d):
                    se = d[metric + "_se"] and 100 * d[metric + "_se"]
                    return f"{100 * d[metric]:.1f} +- {confidence.fmt_num(se, '.1f')}"
                row = {s: cell(shared[s][bench]) for s in ("original", "sae")}
                row.update({s: cell(mine[s][bench]) for s in ("sae_lora", "lora") if s in mine})
                L.append(f"| {g['name']} | {LABELS.get(bench, bench)} | {metric} | {shared['original'][bench]['n']} | "
                         f"{row['sae']} | {row.get('sae_lora', '-')} | {row['original']} | {row.get('lora', '-')} |")
    return L
