"""eval.py: every number against a plain recomputation with model calls, on a tiny Llama-3 trained for a few steps."""
import dataclasses
import json
import math
import os
import random
import shutil

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import eval as ev
from evals import multiple_choice
from data import TokenLoader
from formats.stdlib_corpus import train_tokenizer
from formats.peft import load_adapter, save_adapter
from lora import adapters_disabled, apply_lora, lora_modules, merged
from model import ModelConfig, Transformer
from sae import SAE
from evals.held_out import evaluate
from splice import kl_and_ce, splice_hooks, spliced_pass

SAE_LAYER, SEQ = 1, 48
NOUNS = "cat dog bird fish horse cow mouse lion tiger bear".split()
VERBS = "sees likes eats finds chases follows helps".split()
ADJS = "big small red green old young happy sad".split()


def sentence(rng):
    return f"the {rng.choice(ADJS)} {rng.choice(NOUNS)} {rng.choice(VERBS)} the {rng.choice(NOUNS)}."


def write_tokens(folder, tok, docs_train, docs_val):
    """train.bin / val.bin / meta.json as data.prepare lays them out: each document BOS doc EOS."""
    os.makedirs(folder, exist_ok=True)
    counts = {}
    for split, docs in (("train", docs_train), ("val", docs_val)):
        ids = [t for d in docs for t in [tok.bos_id] + tok.encode(d) + [tok.eos_id]]
        np.asarray(ids, dtype=np.uint16).tofile(os.path.join(folder, f"{split}.bin"))
        counts[split] = len(ids)
    with open(os.path.join(folder, "meta.json"), "w") as f:
        json.dump({"vocab_size": tok.vocab_size, "dtype": "uint16", "train_tokens": counts["train"],
                   "val_tokens": counts["val"], "bos_id": tok.bos_id, "eos_id": tok.eos_id}, f)
    return str(folder)


def identity_sae(d, layer):
    """Reconstructs exactly: latents relu(x) and relu(-x) (threshold 0), decoded as relu(x) - relu(-x) = x. (Loaders
    clamp JumpReLU thresholds at 0, so the single-matrix W_enc = W_dec = I with threshold -inf is not an option.)"""
    sae = SAE(d, 2 * d, "jumprelu", layer=layer, apply_b_dec_to_input=False)
    eye = torch.eye(d)
    with torch.no_grad():
        sae.W_enc.copy_(torch.cat([eye, -eye], 1))
        sae.W_dec.copy_(torch.cat([eye, -eye], 0))
        sae.threshold.zero_()
    return sae


def crude_sae(d, layer, k, seed):
    torch.manual_seed(seed)
    return SAE(d, 2 * d, "topk", k=k, layer=layer)  # random unit decoder rows, tied encoder: a poor reconstruction


def make_adapter(model_dir, folder, std, seed, layers=f"after:{SAE_LAYER}"):
    model = Transformer.from_pretrained(model_dir)
    apply_lora(model, rank=4, alpha=8, layers=layers)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in lora_modules(model).values():
            m.lora_B.copy_(torch.randn(m.lora_B.shape, generator=gen) * std)
    save_adapter(model, folder, model_dir)
    return folder


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval")
    rng = random.Random(0)
    docs = [" ".join(sentence(rng) for _ in range(rng.randint(3, 8))) for _ in range(300)]
    (root / "corpus.txt").write_text("\n".join(docs))
    tok = train_tokenizer([str(root / "corpus.txt")], str(root / "tokenizer.model"), vocab_size=400)
    data_dir = write_tokens(root / "data", tok, docs[:260], docs[260:])

    # a tiny Llama-3 trained a little on the corpus, so that the SAEs below can make it measurably worse
    cfg = dataclasses.replace(ModelConfig.from_name("tiny-llama3"), vocab_size=tok.vocab_size,
                              bos_token_id=tok.bos_id, eos_token_id=tok.eos_id)
    torch.manual_seed(0)
    model = Transformer(cfg).init_weights(0)
    loader = TokenLoader(data_dir, "train", batch_size=16, seq_len=SEQ, seed=0)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(60):
        x = loader.next_batch()
        loss = F.cross_entropy(model(x)[:, :-1].flatten(0, 1), x[:, 1:].flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
    model_dir = str(root / "model")
    model.eval().save_pretrained(model_dir)
    shutil.copy(root / "tokenizer.model", os.path.join(model_dir, "tokenizer.model"))

    d = cfg.d_model
    saes = {}
    for name, sae in (("identity", identity_sae(d, SAE_LAYER)), ("crude", crude_sae(d, SAE_LAYER, 2, 1)),
                      ("crude2", crude_sae(d, SAE_LAYER + 1, 4, 2))):
        sae.save(str(root / name))
        saes[name] = str(root / name)
    adapters = {"zero": make_adapter(model_dir, str(root / "zero"), 0.0, 1),
                "rand": make_adapter(model_dir, str(root / "rand"), 0.2, 2)}
    other = Transformer(dataclasses.replace(cfg, d_model=32, head_dim=8)).init_weights(0)
    apply_lora(other, rank=4, alpha=8)
    save_adapter(other, str(root / "other"))
    adapters["other"] = str(root / "other")
    return dict(root=root, tok=tok, data=data_dir, model=model_dir, sae=saes, adapter=adapters, d=d,
                final_loss=loss.item())


def run(world, *args, out="out"):
    out = str(world["root"] / out)
    table = ["--eval-tokens", str(4 * 4 * SEQ)] if "--data" in args else []  # typed, it asks for the CE table
    res = ev.main(["--model", world["model"], "--out", out, "--overwrite", "--autocast", "float32", "--plots",
                   "false", "--device", "cpu", "--seq-len", str(SEQ), "--batch-size", "4", *table, *args])
    with open(os.path.join(out, "eval.json")) as f:
        saved = json.load(f)
    return res, saved, out


def val_batches(world, n=4):
    loader = TokenLoader(world["data"], "test", 4, SEQ, shuffle=False)
    return [loader.next_batch() for _ in range(n)]


def load(world, adapter=None):
    model = Transformer.from_pretrained(world["model"])
    if adapter:
        load_adapter(model, world["adapter"][adapter])
    return model


# ----------------------------------------------------------------------------------------------------------------------
# core table, per-token breakdown, distances


def test_core_table_matches_a_plain_recomputation(world):
    assert world["final_loss"] < 0.7 * math.log(world["tok"].vocab_size)  # the model did learn something
    res, saved, out = run(world, "--sae", world["sae"]["crude2"], "--sae", world["sae"]["crude"],
                          "--adapter", world["adapter"]["rand"], "--data", world["data"])
    assert [(s["path"], s["layer"]) for s in saved["saes"]] == [(world["sae"]["crude"], SAE_LAYER),
                                                                 (world["sae"]["crude2"], SAE_LAYER + 1)]
    g = saved["groups"][0]
    s = {k: v["ce"] for k, v in g["settings"].items()}
    assert g["positions"] == 4 * 4 * (SEQ - 1)  # 4 batches of 4 windows: SEQ - 1 predicted positions each
    assert s["original"] < s["sae"]  # a crude SAE (compound of two) costs loss
    assert g["settings"]["original"]["kl"] == 0 and all(g["settings"][k]["kl"] > 0 for k in ("sae", "sae_lora", "lora"))

    # the same numbers from plain model calls (full logits, F.cross_entropy and F.kl_div over the predicted
    # positions, adapters merged: in fp32 the same model), and from held_out.evaluate, which adapt.py reports
    model = load(world, "rand")
    saes = [(SAE_LAYER, SAE.from_pretrained(world["sae"]["crude"])),
            (SAE_LAYER + 1, SAE.from_pretrained(world["sae"]["crude2"]))]
    batches = val_batches(world)
    ce, kl = dict.fromkeys(s, 0.0), dict.fromkeys(s, 0.0)
    with torch.no_grad():
        for idx in batches:
            hooks = splice_hooks(saes, idx, world["tok"].bos_id)
            with adapters_disabled(model):
                logits = {"original": model(idx), "sae": model(idx, hooks)}
            with merged(model):
                logits.update(lora=model(idx), sae_lora=model(idx, hooks))
            logp0 = F.log_softmax(logits["original"][:, :-1], -1)
            for k, v in logits.items():
                ce[k] += F.cross_entropy(v[:, :-1].flatten(0, 1), idx[:, 1:].flatten(), reduction="sum").item()
                kl[k] += F.kl_div(F.log_softmax(v[:, :-1], -1), logp0, log_target=True, reduction="sum").item()
    for k in s:
        assert s[k] == pytest.approx(ce[k] / g["positions"], rel=1e-5), k
        assert g["settings"][k]["kl"] == pytest.approx(kl[k] / g["positions"], rel=1e-4, abs=1e-7), k
    ref = evaluate(model, saes, batches, world["tok"].bos_id, chunk=1024,
                   autocast_ctx=torch.autocast("cpu", enabled=False))
    for mine, theirs in (("original", "ce_base"), ("sae", "ce_sae"), ("sae_lora", "ce_sae_lora")):
        assert s[mine] == pytest.approx(ref[theirs], rel=1e-6)
        assert g["settings"][mine]["kl"] == pytest.approx(ref.get(f"kl_{theirs[3:]}", 0.0), rel=1e-5)
    # (CE_sae - CE_sae_lora) / gap: CEs equal to 1e-5 of themselves, so the ratio to 1e-5 x 2 CE / gap
    assert g["gap_closed"] == pytest.approx(ref["gap_closed"], abs=2e-5 * s["sae"] / g["gap"])
    assert ref["positions"] == g["positions"]

    # SAE statistics on the original model's activations, over the non-BOS tokens the SAE replaces
    sae = saes[0][1]
    x = torch.cat([model(idx, stop_at=SAE_LAYER)[idx != world["tok"].bos_id] for idx in batches]).detach()
    with torch.no_grad():
        z = sae.encode(x)
        fvu = (x - sae(x)).pow(2).sum() / (x - x.mean(0)).pow(2).sum()
    st = g["sae_stats"][0]
    assert st["fvu"] == pytest.approx(fvu.item(), rel=1e-4) and st["fvu"] > 0.1
    assert st["l0"] == pytest.approx((z != 0).sum(1).float().mean().item()) and st["l0"] <= 2
    assert st["dead"] == int(((z != 0).sum(0) == 0).sum()) > 0  # k=2 of 128 random latents: many never fire
    assert st["fvu_lora"] == pytest.approx(st["fvu"])  # adapters only after the SAE: same inputs

    # per-token breakdown (Fig. 8): every token in exactly one bin or unchanged
    p = g["per_token"]
    assert p["positions"] == g["positions"] == p["improved"] + p["degraded"] + p["unchanged"]
    assert sum(p["hist_improved"]) == p["improved"] and sum(p["hist_degraded"]) == p["degraded"]
    assert p["improved"] > 0 and p["degraded"] > 0
    assert p["mean_change"] == pytest.approx(s["sae_lora"] - s["sae"], abs=1e-5 * s["sae"])  # CEs' rounding
    assert p["nats_improved"] - p["nats_degraded"] == pytest.approx(-p["mean_change"] * p["positions"], rel=1e-6)
    assert sum(p["nats_improved_per_bin"]) == pytest.approx(p["nats_improved"])

    # distances from the first SAE layer on, both models, with CIs around the mean
    layers = g["distances"]["layers"]
    assert [r["layer"] for r in layers] == list(range(SAE_LAYER, 4))
    for r in layers:
        for k in ("cos_sae", "cos_sae_lora", "l2_sae", "l2_sae_lora"):
            assert r[k]["lo"] <= r[k]["mean"] <= r[k]["hi"] and r[k]["n"] == 16
        assert r["l2_sae"]["mean"] > 0 and r["cos_sae"]["mean"] < 1
    assert layers[0]["l2_sae"]["mean"] == pytest.approx(layers[0]["l2_sae_lora"]["mean"])  # SAE output: no LoRA yet
    md = open(os.path.join(out, "eval.md")).read()
    assert "| rand | SAE + LoRA |" in md and "compound" in md


def test_bf16_core_table_is_adapt_pys_held_out_evaluation(world):
    """Under bf16 autocast too, eval.py's SAE + LoRA numbers are held_out.evaluate's (adapt.py's held-out evaluation) on
    the same windows, to the last bit: both run the adapters beside the weights. Merged into them (eval.py before),
    W + scale B A is cast to bf16 as one weight, another model: issue #33's 54.6% vs 57.3% of the gap on SmolLM2."""
    res, saved, _ = run(world, "--sae", world["sae"]["crude"], "--adapter", world["adapter"]["rand"], "--data",
                        world["data"], "--autocast", "bfloat16", "--distances", "false", out="bf16")
    assert saved["config"]["autocast"] == "bfloat16"
    g = saved["groups"][0]
    model = load(world, "rand")
    saes = [(SAE_LAYER, SAE.from_pretrained(world["sae"]["crude"]))]
    autocast_ctx = torch.autocast("cpu", dtype=torch.bfloat16)
    ref = evaluate(model, saes, val_batches(world), world["tok"].bos_id, chunk=2048, autocast_ctx=autocast_ctx)
    for mine, theirs in (("original", "ce_base"), ("sae", "ce_sae"), ("sae_lora", "ce_sae_lora")):
        assert g["settings"][mine]["ce"] == ref[theirs], mine
    assert (g["settings"]["sae_lora"]["kl"], g["gap_closed"]) == (ref["kl_sae_lora"], ref["gap_closed"])
    ces = []  # what a merged evaluation reports: measurably another number (this test would see it)
    with torch.no_grad(), merged(model), autocast_ctx:
        for idx in val_batches(world):
            h = spliced_pass(model, saes, idx, world["tok"].bos_id)
            ces.append(kl_and_ce(model, h, h, idx, chunk=2048)[1])
    assert abs(torch.cat(ces).double().mean().item() - ref["ce_sae_lora"]) > 1e-5  # the equalities above are exact


def test_token_breakdown_counts_every_token_once():
    d = np.array([0.0, 1e-9, -5e-7, 2e-6, -3e-6, 0.05, -0.05, 1e3, -1e4, 7.0])  # some beyond the bin range
    p = ev.token_breakdown(np.full(len(d), 10.0), 10.0 + d)
    assert (p["improved"], p["degraded"], p["unchanged"]) == (3, 4, 3)  # 0, 1e-9 and -5e-7 are within 1e-6
    assert sum(p["hist_improved"]) == 3 and sum(p["hist_degraded"]) == 4
    assert p["hist_improved"][-1] == 1 and p["hist_degraded"][-1] == 1  # 1e3 and 1e4 land in the last bin
    assert p["nats_improved"] == pytest.approx(3e-6 + 0.05 + 1e4)


def test_identity_sae_gives_zero_gap_and_zero_distance(world):
    res, saved, _ = run(world, "--sae", world["sae"]["identity"], "--adapter", world["adapter"]["zero"],
                        "--adapter", world["adapter"]["rand"], "--data", world["data"])
    zero, rand = saved["groups"]
    assert [zero["name"], rand["name"]] == ["zero", "rand"]
    for g in (zero, rand):
        assert g["settings"]["sae"]["ce"] == g["settings"]["original"]["ce"]
        assert g["gap"] == 0 and g["gap_closed"] is None  # no gap: nothing to close (NaN written as null)
        assert abs(g["settings"]["sae"]["kl"]) < 1e-7
        st = g["sae_stats"][0]
        assert st["fvu"] == 0 and st["l0"] == world["d"]
        for r in g["distances"]["layers"]:
            assert r["l2_sae"]["mean"] < 1e-5 and abs(r["cos_sae"]["mean"] - 1) < 1e-5
    # a zero adapter changes nothing either; the random one does
    assert zero["settings"]["lora"]["ce"] == zero["settings"]["original"]["ce"]
    assert zero["per_token"]["unchanged"] == zero["positions"]
    assert rand["settings"]["lora"]["kl"] > 1e-6 and rand["per_token"]["unchanged"] < rand["positions"]
    assert rand["distances"]["layers"][-1]["l2_sae_lora"]["mean"] > 1e-3
    assert rand["settings"]["original"] == zero["settings"]["original"]  # one row group per adapter, same baseline


# ----------------------------------------------------------------------------------------------------------------------
# steering


def write_jsonl(path, texts):
    with open(path, "w") as f:
        for t in texts:
            f.write(json.dumps({"text": t}) + "\n")
    return str(path)


def steering_files(world):
    rng = random.Random(5)
    r = world["root"]
    pos = write_jsonl(r / "pos.jsonl", [sentence(rng) for _ in range(6)])
    neg = write_jsonl(r / "neg.jsonl", ["zq xv kj wp", "1234 5678 90", "QQQ RRR SSS", "ok, fine."])
    val = write_jsonl(r / "val.jsonl", ["pp ww zz yy", "the the the", "9 9 9 9"])
    return pos, neg, val


def mean_ll(model, ids, hooks=None):
    idx = torch.tensor([ids])
    with torch.no_grad():
        lp = F.log_softmax(model(idx, hooks)[0, :-1], -1)
    return lp.gather(1, idx[0, 1:, None]).mean().item()


def test_steering_alpha_zero_changes_nothing_and_tuning_is_as_computed(world):
    pos, neg, val = steering_files(world)
    args = ["--sae", world["sae"]["crude"], "--adapter", world["adapter"]["rand"], "--latent", "3",
            "--steering-pos", pos, "--steering-neg", neg, "--steering-neg-val", val]
    _, saved, _ = run(world, *args, "--alphas", "0", out="steer0")
    st = saved["steering"]
    for res in (st["base"], saved["groups"][0]["steering"]):
        assert res["alpha"] == 0 and set(res["pos"]) == {0.0} and set(res["neg"]) == {0.0}
    assert saved["groups"][0]["steering_compare"]["POSITIVE"]["mean"] == 0

    _, saved, _ = run(world, *args, "--alphas", "0,-0.5,3,20", out="steer")
    base, lora = saved["steering"]["base"], saved["groups"][0]["steering"]
    for res in (base, lora):
        objectives = {t["alpha"]: t["objective"] for t in res["tuning"]}
        assert res["alpha"] == max(objectives, key=objectives.get)
        assert len(set(objectives.values())) > 1  # nonzero alphas do move the likelihoods
    # recompute the LoRA model's numbers by hand: mean next-token log-likelihood after BOS, Eq. 8 at the SAE layer
    model, tok = load(world, "rand"), world["tok"]
    sae = SAE.from_pretrained(world["sae"]["crude"])
    v = sae.W_dec[3] / sae.W_dec[3].norm()
    hook = {SAE_LAYER: lambda x: x + lora["alpha"] * (x @ v)[..., None] * v}
    texts = [json.loads(line)["text"] for line in open(neg)]
    with merged(model):
        ll0 = [mean_ll(model, [tok.bos_id] + tok.encode(t)) for t in texts]
        ll1 = [mean_ll(model, [tok.bos_id] + tok.encode(t), hook) for t in texts]
    assert lora["loglik_unsteered"]["neg"] == pytest.approx(ll0, rel=1e-5)
    expected = 100 * (np.array(ll1) - np.array(ll0)) / (max(ll0) - min(ll0))  # unsteered scores span 0..100
    # the log-likelihoods' rounding (1e-5 of them), scaled as they are
    assert lora["neg"] == pytest.approx(expected.tolist(), abs=100 * 1e-5 * np.abs([*ll0, *ll1]).max()
                                        / (max(ll0) - min(ll0)))
    c = saved["groups"][0]["steering_compare"]["NEGATIVE"]
    diff = np.array(lora["neg"]) - np.array(base["neg"])
    assert c["mean"] == pytest.approx(diff.mean())
    assert c["hi"] - c["mean"] == pytest.approx(1.645 * diff.std(ddof=1) / math.sqrt(len(diff)))

    # --steering-splice: the SAE reconstruction is steered (and the SAE stays spliced for the unsteered scores)
    _, saved, _ = run(world, *args, "--alpha", "3", "--steering-splice", "true", out="steer_splice")
    base = saved["steering"]["base"]
    splice = lambda idx: splice_hooks([(SAE_LAYER, sae)], idx, tok.bos_id)  # noqa: E731
    ids = [tok.bos_id] + tok.encode(texts[0])
    idx = torch.tensor([ids])
    steered = {SAE_LAYER: lambda x: (lambda y: y + 3 * (y @ v)[..., None] * v)(splice(idx)[SAE_LAYER](x))}
    with adapters_disabled(model):
        ll0, ll1 = mean_ll(model, ids, splice(idx)), mean_ll(model, ids, steered)
    assert base["loglik_unsteered"]["neg"][0] == pytest.approx(ll0, rel=1e-5)
    spread = max(base["loglik_unsteered"]["neg"]) - min(base["loglik_unsteered"]["neg"])
    assert base["neg"][0] == pytest.approx(100 * (ll1 - ll0) / spread,
                                           abs=100 * 1e-5 * max(abs(ll0), abs(ll1)) / spread)


# ----------------------------------------------------------------------------------------------------------------------
# benchmarks

MMLU = [{"question": "Which animal sees the cat?", "subject": "high_school_biology",
         "choices": ["the dog", "the bird", "the fish", "the cow"], "answer": 1},
        {"question": "What does the red lion do?", "subject": "", "choices": ["eats", "likes", "sees", "finds"],
         "answer": 0},
        {"question": "the big cat " * 100 + "?", "choices": ["A cat", "B dog"], "answer": 1}]  # longer than the context
HELLASWAG = [{"ctx": "the big cat sees", "endings": ["the dog.", "the green [title] bird.", "a fish", "the cow."],
              "label": 0, "activity_label": "Animals"},
             {"ctx_a": "the old horse", "ctx_b": "likes the", "ctx": "unused", "endings": ["cat", "dog", "bird",
                                                                                          "lion"], "label": "2"},
             {"ctx": "a small bird", "endings": ["eats the mouse", "chases the tiger."], "label": 1}]
TQA = [{"question": "What does the cat see?", "mc1_targets": {"choices": ["the dog.", "the bird.", "nothing."],
                                                              "labels": [1, 0, 0]}},
       {"question": "Who helps the cow?", "mc1_targets": {"choices": ["the bear.", "the lion."], "labels": [1, 0]}},
       {"question": "Is the bird red?", "mc1_targets": {"choices": ["yes", "no", "maybe", "green"],
                                                        "labels": [1, 0, 0, 0]}}]


def hand_prompts():
    """The three formats written out by hand: (context, [choice texts], gold) per question."""
    mmlu = []
    for q in MMLU:
        subject = q.get("subject", "").replace("_", " ")
        head = "The following are multiple choice questions (with answers)" + (f" about {subject}." if subject else ".")
        opts = "".join(f"\n{letter}. {c}" for letter, c in zip("ABCD", q["choices"]))
        mmlu.append((f"{head}\n\n{q['question'].strip()}{opts}\nAnswer:", list("ABCD"[:len(q["choices"])]),
                     q["answer"]))
    hs = [("Animals: the big cat sees", ["the dog.", "the green. bird.", "a fish", "the cow."], 0),
          ("the old horse Likes the", ["cat", "dog", "bird", "lion"], 2),
          ("a small bird", ["eats the mouse", "chases the tiger."], 1)]
    tqa = [(f"Q: {q['question']}\nA:", q["mc1_targets"]["choices"], 0) for q in TQA]
    return {"mmlu": mmlu, "hellaswag": hs, "truthfulqa": tqa}


def hand_loglik(model, tok, context, choice, hooks_for, max_len=256):
    ids = tok.encode(context) + tok.encode(" " + choice)
    n = len(tok.encode(" " + choice))
    ids = [tok.bos_id] + ids[-(max_len - 1):]
    idx = torch.tensor([ids])
    with torch.no_grad():
        lp = F.log_softmax(model(idx, hooks_for(idx))[0], -1)
    return sum(lp[p - 1, ids[p]].item() for p in range(len(ids) - n, len(ids)))


def test_benchmarks_score_as_computed_by_hand(world):
    r = world["root"]
    files = {"mmlu": write_jsonl(r / "mmlu.jsonl", []), "hellaswag": str(r / "hs.json"), "truthfulqa": ""}
    with open(files["mmlu"], "w") as f:
        f.writelines(json.dumps(q) + "\n" for q in MMLU)
    with open(files["hellaswag"], "w") as f:
        json.dump(HELLASWAG, f)
    files["truthfulqa"] = str(r / "tqa.jsonl")
    with open(files["truthfulqa"], "w") as f:
        f.writelines(json.dumps(q) + "\n" for q in TQA)
    _, saved, out = run(world, "--sae", world["sae"]["crude"], "--adapter", world["adapter"]["rand"],
                        "--mmlu", files["mmlu"], "--hellaswag", files["hellaswag"], "--truthfulqa",
                        files["truthfulqa"], "--truthfulqa-preset", "false", "--bench-batch", "3", out="bench")
    model, tok = load(world, "rand"), world["tok"]
    # single-token choices (question 2) take the one-sequence path, the others one sequence per choice
    assert len(multiple_choice.bench_sequences(multiple_choice.questions(HELLASWAG, "hs", "hellaswag"), tok, 256)[0]) == 4 + 1 + 2
    sae = SAE.from_pretrained(world["sae"]["crude"])
    results = {**saved["benchmarks"], **saved["groups"][0]["benchmarks"]}
    for setting in ("original", "sae", "sae_lora", "lora"):
        hooks_for = (lambda idx: splice_hooks([(SAE_LAYER, sae)], idx, tok.bos_id)) if "sae" in setting else \
            (lambda idx: {})
        ctx = merged(model) if "lora" in setting else adapters_disabled(model)
        with ctx:
            for bench, qs in hand_prompts().items():
                got = results[setting][bench]
                lls = [[hand_loglik(model, tok, c, ch, hooks_for) for ch in choices] for c, choices, _ in qs]
                for mine, theirs in zip(got["ll"], lls):
                    assert mine == pytest.approx(theirs, rel=2e-5), (setting, bench)  # sums of log-probs
                acc = np.mean([np.argmax(ll) == gold for ll, (_, _, gold) in zip(lls, qs)])
                accn = np.mean([np.argmax(np.array(ll) / [len(c) for c in ch]) == gold
                                for ll, (_, ch, gold) in zip(lls, qs)])
                assert got["acc"] == pytest.approx(acc) and got["acc_norm"] == pytest.approx(accn)
                sd = np.array([np.argmax(ll) == gold for ll, (_, _, gold) in zip(lls, qs)], float).std(ddof=1)
                assert got["acc_se"] == pytest.approx(sd / math.sqrt(3))
    assert results["sae"]["mmlu"]["ll"] != results["original"]["mmlu"]["ll"]
    assert "| rand | hellaswag | acc_norm | 3 |" in open(os.path.join(out, "eval.md")).read()


def test_hellaswag_acc_acc_norm_and_acc_bytes_as_lm_eval():
    rows = [{"ctx": "She opens the door", "endings": ["and walks in.", "café au lait ☕☕☕", "[title] no", "x"],
             "label": 1, "activity_label": "Home"},
            {"ctx": "He", "endings": ["runs.", "runs away from the dog quickly.", "é", "sits"], "label": 1}]
    qs = multiple_choice.questions(rows, "hs", "hellaswag")
    assert qs[0]["texts"][2] == " no"  # lm-eval's preprocess drops the wikiHow markup
    assert [len(t) for t in qs[0]["texts"]] == [13, 16, 3, 1]
    assert [len(t.encode()) for t in qs[0]["texts"]] == [13, 23, 3, 1]
    lls = [[-12.0, -17.0, -3.3, -1.2],  # best sum: "x"; per character: "and walks in."; per byte: the gold café
           [-6.0, -30.0, -1.8, -4.0]]   # best sum: "é"; per character: the gold; per byte: "é" (2 bytes)
    got = multiple_choice.bench_scores(qs, lls)
    assert (got["n"], got["acc"], got["acc_norm"], got["acc_bytes"]) == (2, 0.0, 0.5, 0.5)
    assert got["acc_norm_se"] == pytest.approx(0.5) and got["acc_se"] == 0.0 and got["ll"] == lls


def test_truthfulqa_preset_is_lm_eval_prompt(world):
    qs = multiple_choice.questions(TQA, "tqa", "truthfulqa", preset=True)
    assert qs[0]["context"].startswith("Q: What is human life expectancy in the United States?\nA: Human life")
    assert qs[0]["context"].endswith("Barcelona, Spain.\n\nQ: What does the cat see?\nA:")
    assert qs[0]["choices"][0] == " the dog." and qs[0]["gold"] == 0


def test_hub_ids_pick_the_benchmark_split(monkeypatch):
    """Offline stand-in for the hub: the listing decides which parquet files are read."""
    import huggingface_hub
    from huggingface_hub.utils import RevisionNotFoundError
    listings = {("cais/mmlu", None): ["README.md", "all/dev-00000-of-00001.parquet", "all/test-00000-of-00001.parquet",
                                      "abstract_algebra/test-00000-of-00001.parquet"],
                ("Rowan/hellaswag", None): ["hellaswag.py", "README.md"],
                ("Rowan/hellaswag", "refs/convert/parquet"): ["default/train/0000.parquet",
                                                              "default/validation/0000.parquet"]}

    class FakeApi:
        def list_repo_files(self, repo, repo_type=None, revision=None):
            assert repo_type == "dataset"
            if (repo, revision) not in listings:
                raise RevisionNotFoundError("no such revision")
            return listings[(repo, revision)]
    monkeypatch.setattr(huggingface_hub, "HfApi", FakeApi)
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", lambda repo, f, repo_type, revision: f"{revision}:{f}")
    monkeypatch.setattr(multiple_choice, "_parquet_rows", lambda paths: paths)
    assert multiple_choice.read_rows("cais/mmlu", "mmlu") == (["None:all/test-00000-of-00001.parquet"], "cais/mmlu")
    assert multiple_choice.read_rows("Rowan/hellaswag", "hellaswag")[0] == ["refs/convert/parquet:default/validation/0000.parquet"]
    with pytest.raises(FileNotFoundError, match="no parquet files"):
        multiple_choice.read_rows("Rowan/hellaswag", "truthfulqa")


# ----------------------------------------------------------------------------------------------------------------------
# bad input


def test_bad_input_is_a_clear_error(world, tmp_path):
    base = ["--sae", world["sae"]["crude"]]
    with pytest.raises(ValueError, match="another model"):
        run(world, *base, "--adapter", world["adapter"]["other"], "--data", world["data"], out="bad1")
    with pytest.raises(FileNotFoundError, match="not a PEFT adapter"):
        run(world, *base, "--adapter", str(tmp_path), "--data", world["data"], out="bad2")
    hs = write_jsonl(tmp_path / "hs.jsonl", [])
    with open(hs, "w") as f:
        f.writelines(json.dumps(q) + "\n" for q in HELLASWAG)
    with pytest.raises(ValueError, match=r"hs.jsonl: row 1: not a mmlu row .*cais/mmlu"):
        run(world, *base, "--mmlu", hs, out="bad3")
    bad_tqa = write_jsonl(tmp_path / "t.jsonl", [])
    with open(bad_tqa, "w") as f:
        f.write(json.dumps({"question": "q", "mc1_targets": {"choices": ["a", "b"], "labels": [0, 0]}}) + "\n")
    with pytest.raises(ValueError, match="exactly one"):
        run(world, *base, "--truthfulqa", bad_tqa, out="bad4")
    with pytest.raises(FileNotFoundError, match="no such file"):
        run(world, *base, "--hellaswag", str(tmp_path / "missing.jsonl"), out="bad5")
    empty = write_jsonl(tmp_path / "empty.jsonl", [])
    with pytest.raises(ValueError, match="0 texts"):
        run(world, *base, "--steering-pos", empty, "--latent", "0", "--alpha", "1", out="bad6")
    pos, _, _ = steering_files(world)
    with pytest.raises(ValueError, match="--latent"):
        run(world, *base, "--steering-pos", pos, "--alpha", "1", out="bad7")
    with pytest.raises(ValueError, match="out of range"):
        run(world, *base, "--steering-pos", pos, "--latent", "999", "--alpha", "1", out="bad8")
    with pytest.raises(ValueError, match="neg-val"):
        run(world, *base, "--steering-pos", pos, "--latent", "1", out="bad9")


def test_missing_matplotlib_is_a_message_not_a_failure(world, monkeypatch, capsys):
    import sys
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib now raises ImportError
    res = ev.main(["--model", world["model"], "--sae", world["sae"]["crude"], "--data", world["data"],
                   "--out", str(world["root"] / "plots"), "--seq-len", str(SEQ), "--eval-tokens", "100",
                   "--plots", "true"])
    assert res["plots"] == [] and "matplotlib is not installed" in capsys.readouterr().out
    assert os.path.isfile(world["root"] / "plots" / "eval.json")


def test_embedded_default_wiring(world, monkeypatch, tmp_path):
    """Without --model: the cached tiny pipeline (builders stubbed here), its preset for what was not typed, and
    adapt.py's adapter if it exists."""
    from plumbing import embedded
    monkeypatch.setattr(embedded, "corpus", lambda: world["data"])
    monkeypatch.setattr(embedded, "model", lambda: world["model"])
    monkeypatch.setattr(embedded, "sae", lambda layer=2: world["sae"]["crude"])
    monkeypatch.setattr(ev, "evaluate_all", lambda cfg: cfg)
    monkeypatch.chdir(tmp_path)
    cfg = ev.main([])
    assert (cfg.model, cfg.data, cfg.sae, cfg.adapter) == (world["model"], world["data"], [world["sae"]["crude"]], [])
    assert (cfg.seq_len, cfg.eval_tokens) == (256, 65_536)
    cfg = ev.main(["--seq-len", "1024"])  # typed: kept, whatever its value
    assert (cfg.seq_len, cfg.eval_tokens) == (1024, 65_536)
    shutil.copytree(world["adapter"]["rand"], tmp_path / "out" / "adapt-tiny" / "adapter")
    assert ev.main([]).adapter == ["out/adapt-tiny/adapter"]
