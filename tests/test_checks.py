"""experiments/checks.py: functional-check inputs from held-out documents only, on a temp corpus of Python modules
that share some lines (so that "held out" has to mean unseen text), a planted latent, and eval.py reading the files."""
import json
import os
import re
import shutil
import types

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import eval as ev
from evals import multiple_choice
from evals import steering
from formats.corpus import split_documents
from data import prepare
from formats.stdlib_corpus import train_tokenizer
from experiments import checks
from formats.peft import save_adapter
from lora import apply_lora, lora_modules
from model import ModelConfig, Transformer
from sae import SAE

SHARED = "# Copyright (c) The Example Authors.\n# Licensed under the same terms as Python itself.\n"
WORDS = "alpha beta gamma delta omega kappa sigma theta".split()


def module(i: int) -> str:
    """A small module: every line but the shared header and the `get` method names its own number or words."""
    w, v = WORDS[i % len(WORDS)], WORDS[(3 * i + 1) % len(WORDS)]
    return f'''{SHARED}"""Module {i}: helpers for the {w} widget.

The {w} widgets count {v} things and keep them
in order for caller {i} to read back,
one {v} at a time.
"""
import os
import {w}_{i}

LIMIT_{i} = {i} * 10
NAME_{i} = "{w}{i}"  # caf\u00e9 \u2713
__version__ = "1.0"
DEBUG = False


def compute_{i}(x, y):
    """Add x and y, then scale the sum by {i}.

    The {v} sum is kept small for {w}
    and counted once for caller {i}
    before the {v} caller sees it.
    """
    # keep the {v} sum small for {w}
    # and count it once for {i}
    # before the caller {v} sees it
    total = x + y * {i}
    scale = LIMIT_{i} - {i}
    total = total % scale
    return total * LIMIT_{i}


class Holder{i}:
    """Hold one {w} value for widget {i}.

    The {v} holder keeps the value {i}
    until the caller asks for it,
    then hands it over to {w}.
    """

    def __init__(self, value):
        self.value = value + {i}
        self.count = {i}
        self.name = NAME_{i}

    def get(self):
        # the stored value, unchanged
        return self.value
'''


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("checks")
    src = root / "src"
    src.mkdir()
    for i in range(16):
        (src / f"m{i:02d}.py").write_text(module(i))
    tok = train_tokenizer(sorted(str(p) for p in src.iterdir()), str(root / "tok.model"), vocab_size=400)
    meta = prepare(str(src), str(root / "data"), tok, val_tokens=3000, seed=0, layout="bos_chunks", verbose=False)
    held_out, train = split_documents(str(root / "data"), "test", train=True)
    assert 4 <= meta["val_docs"] <= 8 and len(held_out) + len(train) == 16
    return types.SimpleNamespace(root=root, tok=tok, data=str(root / "data"), held_out=held_out, train=train,
                                 docs=checks.parsed(held_out), seen="\n\x00".join(train).__contains__)


def test_held_out_documents_are_what_val_bin_holds(world):
    """corpus.split_documents reads the source again: its documents must be the token files' (decoded)."""
    for split, docs in (("val", world.held_out), ("train", world.train)):
        ids = np.fromfile(os.path.join(world.data, f"{split}.bin"), dtype=np.uint16).tolist()
        assert ids[0] == world.tok.bos_id and ids[-1] == world.tok.eos_id
        cuts = [i for i, t in enumerate(ids) if t == world.tok.bos_id] + [len(ids)]
        assert [world.tok.decode(ids[a + 1:b - 1]) for a, b in zip(cuts, cuts[1:])] == docs


def test_token_spans_spell_the_text_and_constructs_come_from_pythons_tokenizer(world):
    doc = world.held_out[0]
    ids = world.tok.encode(doc)
    spans = checks.token_spans(world.tok, ids, doc)
    assert [s for s, _ in spans[1:]] == [e for _, e in spans[:-1]] and spans[0][0] == 0 and spans[-1][1] == len(doc)
    assert "".join(doc[s:e] for s, e in spans) == doc  # the non-ASCII comment included (byte-fallback pieces)
    assert checks.token_spans(world.tok, ids[:-1], doc) is None
    c = checks.construct_spans(doc)
    assert [doc[s:e] for s, e in c["return"]] == ["return"] * 2 and [doc[s:e] for s, e in c["def"]] == ["def"] * 3
    assert all(doc[s:e] == "self" for s, e in c["self"]) and len(c["self"]) == 6
    assert all(doc[s:e].startswith("#") for s, e in c["comment"]) and len(c["comment"]) == 7
    kinds = checks.line_kinds(doc)
    lines = doc.split("\n")
    assert kinds[:8] == ["comment", "comment", None, None, "docstring", "docstring", "docstring", None]
    assert [lines[i] for i, k in enumerate(kinds) if k == "docstring"][3:] == \
        [x for x in lines if x.startswith(("    The ", "    and ", "    before ", "    until ", "    then "))]
    assert kinds[lines.index("import os")] == "code" and kinds[lines.index("        # the stored value, unchanged")] \
        == "comment"
    assert checks.construct_spans("def f(:\n  return (") is None


def planted_sae(vocab: int, sets: list[set[int]]) -> SAE:
    """Latent j is active exactly on the token ids in sets[j] (for one-hot inputs)."""
    sae = SAE(vocab, len(sets), "jumprelu", layer=0, apply_b_dec_to_input=False)
    with torch.no_grad():
        sae.W_enc.zero_()
        for j, ids in enumerate(sets):
            sae.W_enc[sorted(ids), j] = 1.0
        sae.b_enc.zero_()
        sae.threshold.fill_(0.5)
    return sae.eval()


def test_the_rule_picks_the_planted_latent_with_its_precision_and_recall(world):
    windows, labels = checks.selection_windows(world.tok, world.docs, 64, 10 ** 6)
    ids, lab = np.concatenate([w[1:] for w in windows]), np.concatenate(labels)
    col = {c: checks.CONSTRUCTS.index(c) for c in ("return", "def", "class", "self")}
    on = {c: set(ids[lab[:, k]].tolist()) for c, k in col.items()}  # the token ids that carry each construct
    vocab = world.tok.vocab_size
    decoy = on["return"] | set(range(3, vocab, 5))  # fires on every `return`, and on much else
    sae = planted_sae(vocab, [on["def"] | on["class"], decoy, on["return"], on["self"] | set(range(3, vocab, 7))])
    counts = checks.activity_counts(lambda idx: F.one_hot(idx, vocab).float(), sae, windows, labels, batch=3)
    choice = checks.pick_latent(counts, min_support=1)
    assert (choice["construct"], choice["latent"]) == ("return", 2)
    # against a direct count over the token stream
    fires = np.isin(ids, sorted(on["return"]))
    assert choice["precision"] == pytest.approx((fires & lab[:, col["return"]]).sum() / fires.sum())
    assert choice["recall"] == 1.0 and choice["construct_tokens"] == lab[:, col["return"]].sum()
    assert choice["tokens"] == len(ids) and counts["fires"][1] == np.isin(ids, sorted(decoy)).sum()
    assert choice["runner_up"]["construct"] != "return"
    # too few tokens of `return`: not a candidate, and the next best pair wins
    again = checks.pick_latent(counts, min_support=int(lab[:, col["return"]].sum()) + 1)
    assert again["construct"] != "return" and again["latent"] != 2


def test_steering_texts_are_held_out_disjoint_and_split_by_the_construct(world, monkeypatch):
    monkeypatch.setattr(checks, "MIN_SET", 2)
    sets = checks.steering_sets(world.docs, "self", world.seen, lines=3, n_pos=50, n_neg=50, n_val=6, seed=0)
    assert set(sets) == {"pos", "neg_val", "neg/code", "neg/comment", "neg/docstring"}
    every = [t for ts in sets.values() for t in ts]
    assert len(every) == len(set(every))  # disjoint
    for t in every:
        assert any(t in d for d in world.held_out) and not any(t in d for d in world.train)
        assert len(t.split("\n")) == 3 and all(x.strip() for x in t.split("\n"))
    assert all(re.search(r"\bself\b", t) for t in sets["pos"])
    assert not any(re.search(r"\bself\b", t) for k, ts in sets.items() if k != "pos" for t in ts)
    assert all(t.lstrip().startswith("#") for t in sets["neg/comment"])
    assert not any(SHARED.strip() in t for t in every)  # the licence header is in every training document
    # without the held-out check, texts that a training document holds verbatim come in
    loose = checks.steering_sets(world.docs, "self", lambda t: False, lines=3, n_pos=50, n_neg=50, n_val=6, seed=0)
    assert any(any(t in d for d in world.train) for ts in loose.values() for t in ts)
    # steering.read_inputs reads the files
    paths = {}
    for k, ts in sets.items():
        paths[k] = str(world.root / (k.replace("/", "_") + ".jsonl"))
        checks.write_jsonl(paths[k], [{"text": t} for t in ts])
    cfg = types.SimpleNamespace(steering_pos=paths["pos"], latent=0, alpha=None, alphas="0,1",
                                steering_neg=[paths[k] for k in sets if k.startswith("neg/")],
                                steering_neg_val=paths["neg_val"])
    read = steering.read_inputs(cfg)
    assert read == {"pos": sets["pos"], "neg_val": sets["neg_val"],
                    **{f"neg/neg_{k[4:]}": v for k, v in sets.items() if k.startswith("neg/")}}


def test_mc_rows_are_read_as_hellaswag_and_the_label_points_at_the_true_next_line(world):
    rows = checks.mc_rows(world.docs, world.seen, n=100, context_lines=6, seed=0)
    assert len(rows) >= 8 and len({(r["ctx"], r["endings"][r["label"]]) for r in rows}) == len(rows)
    path = str(world.root / "mc.jsonl")
    checks.write_jsonl(path, rows)
    read, where = multiple_choice.read_rows(path, "hellaswag")
    qs = multiple_choice.questions(read, where, "hellaswag")
    for row, q in zip(rows, qs):
        src = world.held_out[row["doc"]]
        assert q["context"] == row["ctx"] and q["texts"] == row["endings"] and q["gold"] == row["label"]
        assert len(set(q["texts"])) == checks.CHOICES
        true_line = (q["context"] + " " + q["texts"][q["gold"]] + "\n")
        assert true_line in src and not any(true_line in d for d in world.train)
        assert not any(q["context"] + " " + e + "\n" in src for i, e in enumerate(q["texts"]) if i != q["gold"])
    assert len({r["label"] for r in rows}) > 1  # the true ending is not always in one place
    assert multiple_choice.bench_sequences(qs, world.tok, 256)[0]  # every choice tokenizes
    # without the held-out check, questions whose text a training document holds verbatim come in
    loose = checks.mc_rows(world.docs, lambda t: False, n=100, context_lines=6, seed=0)
    assert any(r["ctx"] + " " + r["endings"][r["label"]] in d for r in loose for d in world.train)


def test_build_and_eval_read_the_files_end_to_end(world, tmp_path, monkeypatch):
    monkeypatch.setattr(checks, "MIN_SET", 2)
    cfg = ModelConfig.from_name("tiny-llama3")
    cfg.bos_token_id, cfg.eos_token_id, cfg.vocab_size = world.tok.bos_id, world.tok.eos_id, world.tok.vocab_size
    mdir = str(tmp_path / "model")
    Transformer(cfg).init_weights(0).save_pretrained(mdir)
    shutil.copy(world.tok.path, os.path.join(mdir, "tokenizer.model"))
    torch.manual_seed(0)
    sae_dir = str(tmp_path / "sae")
    SAE(cfg.d_model, 4 * cfg.d_model, "topk", k=8, layer=1).save(sae_dir)
    model = Transformer.from_pretrained(mdir)
    apply_lora(model, rank=2, alpha=4, layers=[2, 3])
    with torch.no_grad():
        for m in lora_modules(model).values():
            m.lora_B.normal_(0, 0.05)
    save_adapter(model, str(tmp_path / "adapter"), mdir)

    info = checks.main(["--model", mdir, "--sae", sae_dir, "--layer", "1", "--data", world.data, "--out",
                        str(tmp_path / "inputs"), "--min-support", "1", "--n-pos", "6", "--n-neg", "4", "--n-val",
                        "4", "--n-mc", "6"])
    assert json.load(open(tmp_path / "inputs" / "inputs.json"))["choice"] == info["choice"]
    f = info["files"]
    res = ev.main(["--model", mdir, "--sae", sae_dir, "--layer", "1", "--data", world.data, "--adapter",
                   str(tmp_path / "adapter"), "--latent", str(info["choice"]["latent"]), "--steering-pos", f["pos"],
                   "--steering-neg-val", f["neg_val"], *[x for k in f if k.startswith("neg/")
                                                           for x in ("--steering-neg", f[k])],
                   "--hellaswag", f["hellaswag"], "--truthfulqa-gen", "corpus", "--alphas", "0,2", "--gen-tokens",
                   "4", "--eval-tokens", "512", "--seq-len", "64", "--plots", "false", "--autocast", "float32",
                   "--out", str(tmp_path / "eval")])
    saved = json.load(open(tmp_path / "eval" / "eval.json"))
    results, md = checks.report(info, saved, 123_456)
    assert results["multiple_choice"]["lora"]["acc"] == res["groups"][0]["benchmarks"]["lora"]["hellaswag"]["acc"]
    assert results["multiple_choice"]["original"]["n"] == 6 and results["steering"]["ours"]["POSITIVE"]["n"] == 6
    assert results["truthfulqa_gen"]["sae"]["n"] == saved["benchmarks"]["sae"]["truthfulqa_gen"]["n"]
    assert md.count("a functional check at this scale (0.1M-parameter model of Python source)") == 5
    assert f"| `{info['choice']['construct']}` | {info['choice']['latent']} |" in md
