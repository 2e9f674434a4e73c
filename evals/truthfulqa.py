"""
TruthfulQA generation for eval.py (the paper's Table 5: BLEU, ROUGE-1, ROUGE-2), scored as lm-evaluation-harness'
truthfulqa_gen task (lm_eval/tasks/truthfulqa/truthfulqa_gen.yaml and utils.py):

- prompt: the six-question QA preset, a blank line, then "Q: " + question (the task's doc_to_text; no "A:" follows);
  BOS first, as lm-eval's HF model encodes it.
- greedy decoding of at most 256 tokens (generate_until's defaults), until EOS or the task's stop sequence "\n\n"
  (its fewshot delimiter); the text before the first stop sequence is the completion.
- the answers: stripped, empty ones dropped, a period added where missing, "I have no comment." added to the correct
  ones (process_docs_gen).
- per question and metric m in BLEU, ROUGE-1, ROUGE-2: the completion's best score against a correct answer (m_max)
  minus its best against an incorrect one (m_diff), and m_acc = 1 if the correct answer wins; each averaged over the
  questions with the standard error sd(ddof=1) / sqrt(n). Table 5 reports the _acc numbers.
- BLEU is sacrebleu's corpus_bleu of the one sentence against the one reference with the "intl" tokenizer and "exp"
  smoothing (lm-eval's bleu()); ROUGE-n is rouge-score's n-gram F-measure without stemming (lm-eval's rouge()), both
  in percent. Written here from those definitions; tests/test_truthfulqa.py checks them against both libraries.

Questions come from a local file or the hub (truthfulqa/truthful_qa, config generation, split validation), or, for the
offline pipeline, from docstrings of the held-out documents of a token folder made from local files ("corpus").
"""
from __future__ import annotations

import ast
import math
import unicodedata
from collections import Counter

import numpy as np

from plumbing import common
from evals import multiple_choice
from evals.generate import complete_setting

UNTIL = ("\n\n",)  # truthfulqa_gen sets no generation_kwargs: lm-eval stops at its fewshot_delimiter
MAX_GEN_TOKS = 256  # lm-eval's default max_gen_toks
METRICS = ("bleu", "rouge1", "rouge2")
FIELDS = "question, correct_answers (list), incorrect_answers (list): the truthful_qa generation format"
PROMPT_ONLY = "truthfulqa_gen_prompt_only"  # the results key of the authors' splice (SAE on the prompt only)


# ----------------------------------------------------------------------------------------------------------------------
# Questions


def _answers(x, where, what) -> list[str]:
    if not isinstance(x, list) or not all(isinstance(a, str) for a in x):
        raise ValueError(f"{where}: {what} must be a list of strings (expected {FIELDS})")
    out = []
    for a in (a.strip() for a in x):  # lm-eval's _format_answers
        if a:
            out.append(a if a.endswith(".") else a + ".")
    return out


def questions(rows, src: str) -> list[dict]:
    """{question, prompt, correct, incorrect} per row, answers formatted as lm-eval's process_docs_gen."""
    out = []
    for n, row in enumerate(rows, 1):
        where = f"{src}: row {n}"
        if not isinstance(row, dict) or any(k not in row for k in ("question", "correct_answers", "incorrect_answers")):
            got = sorted(row) if isinstance(row, dict) else type(row).__name__
            raise ValueError(f"{where}: not a truthfulqa_gen row (has {got}; expected {FIELDS})")
        correct = _answers(row["correct_answers"], where, "correct_answers")
        incorrect = _answers(row["incorrect_answers"], where, "incorrect_answers")
        if "I have no comment." not in correct:
            correct.append("I have no comment.")
        if not incorrect:
            raise ValueError(f"{where}: no incorrect answer to compare with (incorrect_answers is empty)")
        question = str(row["question"]).strip()
        out.append(dict(question=question, prompt=f"{multiple_choice.TQA_PRESET}\n\nQ: {question}", correct=correct,
                        incorrect=incorrect))
    if not out:
        raise ValueError(f"{src}: no truthfulqa_gen questions")
    return out


def read_questions(src: str, limit: int | None = None, data: str | None = None) -> list[dict]:
    """A local .jsonl / .json / .parquet file, a hub id, or "corpus" (questions from --data's held-out documents)."""
    if src == "corpus":
        if not data:
            raise ValueError("--truthfulqa-gen corpus makes questions from --data's held-out documents: pass --data")
        rows, where = corpus_rows(data), f"{data} (held-out documents)"
    else:
        rows, where = multiple_choice.read_rows(src, "truthfulqa_gen")
    return questions(rows[:limit] if limit else rows, where)


def corpus_rows(data_dir: str, n: int = 64) -> list[dict]:
    """An offline question set in the truthful_qa generation format, made from the held-out (val) documents of a token
    folder that data.prepare wrote from local files (the embedded stdlib corpus): for a documented function or class,
    "What does the Python function f do?", its docstring's first line the correct answer and the first lines of the
    next three documented names the incorrect ones. A functional check of the pipeline, not a truthfulness test."""
    from formats.corpus import split_documents
    held_out, _ = split_documents(data_dir, "--truthfulqa-gen corpus")
    found, seen = [], set()
    for doc in held_out:
        try:
            tree = ast.parse(doc)
        except (SyntaxError, ValueError):
            continue
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) and \
                    not node.name.startswith("_") and (doc_ := ast.get_docstring(node)):
                line = doc_.strip().splitlines()[0].strip()
                if 3 <= len(line.split()) <= 30 and line not in seen:
                    seen.add(line)
                    kind = "class" if isinstance(node, ast.ClassDef) else "function"
                    found.append((f"What does the Python {kind} {node.name} do?", line))
    if len(found) < 4:
        raise ValueError(f"{data_dir}: its held-out documents hold {len(found)} documented functions; need at least 4")
    found = found[:n]
    return [{"question": q, "correct_answers": [a],
             "incorrect_answers": [found[(i + j) % len(found)][1] for j in (1, 2, 3)]} for i, (q, a) in enumerate(found)]


# ----------------------------------------------------------------------------------------------------------------------
# BLEU and ROUGE, as sacrebleu and rouge-score compute them for lm-eval


def _cat(c: str) -> str:
    return unicodedata.category(c)[0]


def _pairs(text: str, match, repl) -> str:
    # a regex substitution of a two-character pattern: matches taken left to right, never overlapping
    out, i = [], 0
    while i < len(text):
        if i + 1 < len(text) and match(text[i], text[i + 1]):
            out.append(repl(text[i], text[i + 1]))
            i += 2
        else:
            out.append(text[i])
            i += 1
    return "".join(out)


def intl_tokenize(text: str) -> str:
    """sacrebleu's "intl" tokenizer (mteval-v14's international tokenization): punctuation split off unless between
    digits, symbols always; Unicode categories P (punctuation), S (symbol), N (number)."""
    text = _pairs(text, lambda a, b: _cat(a) != "N" and _cat(b) == "P", lambda a, b: f"{a} {b} ")
    text = _pairs(text, lambda a, b: _cat(a) == "P" and _cat(b) != "N", lambda a, b: f" {a} {b}")
    text = "".join(f" {c} " if _cat(c) == "S" else c for c in text)
    return " ".join(text.split())


def _ngrams(tokens, n) -> Counter:
    return Counter(tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1))


def bleu(ref: str, hyp: str, max_n: int = 4) -> float:
    """Sentence BLEU in percent: clipped n-gram precisions for n = 1..4, "exp" smoothing of zero counts (each zero
    precision becomes 1 / (2^k total), k counting the zeros so far), geometric mean, brevity penalty; 0 when nothing
    matches or the hypothesis is shorter than 4 tokens with no higher-order n-grams (sacrebleu's floor of log 0)."""
    h, r = intl_tokenize(hyp.rstrip()).split(), intl_tokenize(ref.rstrip()).split()
    correct = [sum((_ngrams(h, n) & _ngrams(r, n)).values()) for n in range(1, max_n + 1)]  # & keeps the minimum
    total = [max(len(h) - n + 1, 0) for n in range(1, max_n + 1)]
    if not any(correct) or not all(total):
        return 0.0
    bp = 1.0 if len(h) >= len(r) else math.exp(1 - len(r) / len(h))
    logs, zeros = 0.0, 0
    for c, t in zip(correct, total):
        if c == 0:
            zeros += 1
            logs += math.log(100.0 / (2 ** zeros * t))
        else:
            logs += math.log(100.0 * c / t)
    return bp * math.exp(logs / max_n)


def rouge_tokens(text: str) -> list[str]:
    """rouge-score's default tokenizer: lowercase, every run of characters outside a-z0-9 a separator."""
    t = text.lower()
    return "".join(c if ("a" <= c <= "z" or "0" <= c <= "9") else " " for c in t).split()


def rouge_n(ref: str, hyp: str, n: int) -> float:
    """ROUGE-n F-measure in percent: overlapping n-gram count (clipped), precision over the hypothesis' n-grams,
    recall over the reference's."""
    r, h = _ngrams(rouge_tokens(ref), n), _ngrams(rouge_tokens(hyp), n)
    overlap = sum((r & h).values())
    p, rec = overlap / max(sum(h.values()), 1), overlap / max(sum(r.values()), 1)
    return 100 * (2 * p * rec / (p + rec) if p + rec > 0 else 0.0)


def score(q: dict, completion: str) -> dict:
    """lm-eval's process_results_gen for BLEU, ROUGE-1 and ROUGE-2: {m_max, m_diff, m_acc}."""
    fns = {"bleu": bleu, "rouge1": lambda r, h: rouge_n(r, h, 1), "rouge2": lambda r, h: rouge_n(r, h, 2)}
    out = {}
    for m, fn in fns.items():
        best_true = max(fn(ref, completion) for ref in q["correct"])
        best_false = max(fn(ref, completion) for ref in q["incorrect"])
        out.update({f"{m}_max": best_true, f"{m}_diff": best_true - best_false, f"{m}_acc": int(best_true > best_false)})
    return out


def summarize(qs, completions) -> dict:
    """Means over the questions and their standard errors (lm-eval's mean and mean_stderr), and what was written."""
    per = [score(q, c) for q, c in zip(qs, completions)]
    out = {"n": len(qs)}
    for key in per[0]:
        x = np.array([p[key] for p in per], dtype=np.float64)
        out[key], out[f"{key}_se"] = x.mean(), x.std(ddof=1) / math.sqrt(len(x)) if len(x) > 1 else float("nan")
    return {**out, "completions": list(completions)}


# ----------------------------------------------------------------------------------------------------------------------
# eval.py's entry point


def evaluate(model, tok, qs, saes, unspliced_ids, cfg, autocast_ctx, setting: str) -> dict:
    """{"truthfulqa_gen": ...} for one setting, and with cfg.authors_splice {PROMPT_ONLY: ...}: the SAE spliced on the
    prompt's positions only, as the authors' run (settings without an SAE: the same numbers, not generated again)."""
    if not qs:
        return {}
    out = {}
    for key, prompt_only in (("truthfulqa_gen", False), (PROMPT_ONLY, True)):
        if prompt_only and not cfg.authors_splice:
            continue
        if prompt_only and "sae" not in setting:
            out[key] = out["truthfulqa_gen"]
            continue
        prog = common.Progress(math.ceil(len(qs) / cfg.bench_batch), f"{key} [{setting}]")
        texts = complete_setting(model, tok, [q["prompt"] for q in qs], setting, saes, unspliced_ids,
                                 prompt_only=prompt_only, max_new_tokens=cfg.gen_tokens, stop=UNTIL,
                                 batch_size=cfg.bench_batch, autocast_ctx=autocast_ctx, progress=prog)
        out[key] = summarize(qs, texts)
    return out

