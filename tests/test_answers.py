"""answers.py and `adapt.py --objective ce` (Resa's SAE-Tuning objective): the answer-token CE against transformers'
own causal-LM loss (ForCausalLMLoss, the loss its Trainer and TRL's SFT use) with the prompt's labels at -100, the first
logged training loss against that reference, training lowering it on held-out pairs, exact resume, one-line errors."""
import base64
import json
import os
import random

import pytest
import torch

import adapt
import answers
from model import Transformer
from formats.sae_files import load_saes
from splice import splice_hooks, spliced_pass, unspliced_tokens
from fixtures.tiny import make_data, make_model, make_sae


def byte_tokenizer(folder):
    """A tiktoken rank file of the 256 single bytes (data.py adds Llama-3's 256 special tokens after them: BOS 256,
    EOS 257), which fits the tiny models' 512-token vocabulary."""
    lines = [f"{base64.b64encode(bytes([b])).decode()} {b}" for b in range(256)]
    (folder / "tokenizer.model").write_text("\n".join(lines) + "\n")


def write_pairs(path, n=60, seed=0):
    """Prompts of random letters, answers their first three letters reversed: something to learn."""
    rng = random.Random(seed)
    with open(path, "w") as f:
        for _ in range(n):
            prompt = "".join(rng.choice("abcdef") for _ in range(rng.randint(4, 9)))
            f.write(json.dumps({"prompt": f"q {prompt} a ", "answer": prompt[:3][::-1]}) + "\n")
    return str(path)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("answers")
    model = make_model(root / "model")
    byte_tokenizer(root / "model")
    return dict(model=model, data=make_data(root / "data"), sae=make_sae(root / "sae", "topk", layer=1, k=2),
                pairs=write_pairs(root / "pairs.jsonl"))


def args(files, out, *extra):
    return ["--model", files["model"], "--data", files["data"], "--sae", files["sae"], "--out", str(out),
            "--objective", "ce", "--pairs", files["pairs"], "--seq-len", "32", "--batch-size", "4",
            "--max-tokens", "1024", "--eval-tokens", "256", "--eval-interval", "8", "--log-interval", "1",
            "--ckpt-interval", "4", "--lr", "3e-3", "--rank", "8", "--compile", "false", "--autocast", "float32",
            "--dropout", "0", *extra]


def reference_loss(model, saes, kept, pairs):
    """transformers' ForCausalLMLoss on the spliced model's full logits, labels = ids with the prompt and the padding
    at -100: the mean CE over the answer tokens (and the closing EOS)."""
    from transformers.loss.loss_utils import ForCausalLMLoss
    T = max(len(ids) for ids, _ in pairs)
    idx = torch.zeros(len(pairs), T, dtype=torch.long)
    labels = torch.full((len(pairs), T), -100)
    for b, (ids, n_prompt) in enumerate(pairs):
        idx[b, :len(ids)] = torch.tensor(ids)
        labels[b, n_prompt:len(ids)] = torch.tensor(ids[n_prompt:])
    logits = model(idx, hooks=splice_hooks(saes, idx, kept))
    return ForCausalLMLoss(logits, labels, model.cfg.vocab_size)


def test_answer_loss_is_transformers_causal_lm_loss_on_the_answers(files):
    from formats.tokenizer import load_tokenizer
    model = Transformer.from_pretrained(files["model"])
    saes = load_saes([files["sae"]], None, model, "cpu")
    kept = unspliced_tokens(saes, model.cfg)
    pairs = answers.load_pairs(files["pairs"], load_tokenizer(files["model"]), 32)[:5]
    assert len({len(ids) for ids, _ in pairs}) > 1  # padding is exercised
    idx, mask = answers.collate(pairs, "cpu")
    with torch.no_grad():
        ce, _ = answers.answer_losses(model, spliced_pass(model, saes, idx, kept), idx, mask, chunk=7)
        ref = reference_loss(model, saes, kept, pairs)
        assert ce.mean().item() == pytest.approx(ref.item(), rel=1e-5)
        assert len(ce) == sum(len(ids) - n for ids, n in pairs)  # the answer tokens and EOS, nothing of the prompt
        whole, _ = answers.answer_losses(model, spliced_pass(model, saes, idx, kept), idx, torch.ones_like(mask),
                                         chunk=64)
        assert abs(whole.mean().item() - ref.item()) > 1e-3  # masking the prompt matters


def test_adapt_ce_objective_first_loss_training_and_resume(files, tmp_path, monkeypatch):
    straight = adapt.main(args(files, tmp_path / "a"))
    # the first step's logged loss, before its update, is the reference loss of the first batch
    from formats.tokenizer import load_tokenizer
    model = Transformer.from_pretrained(files["model"])
    saes = load_saes([files["sae"]], None, model, "cpu")
    train, val = answers.split_pairs(answers.load_pairs(files["pairs"], load_tokenizer(files["model"]), 32))
    assert (len(train), len(val)) == (54, 6)
    order = torch.randperm(len(train), generator=torch.Generator().manual_seed(0)).tolist()[:4]
    with torch.no_grad():
        ref = reference_loss(model, saes, unspliced_tokens(saes, model.cfg), [train[i] for i in order])
    first = next(h for h in straight["history"] if "loss" in h)
    assert first["loss"] == pytest.approx(ref.item(), rel=1e-4)
    # training on the answers lowers their held-out CE; the usual CE / KL table is reported beside it
    assert straight["answer_ce_sae_lora"] < 0.9 * straight["answer_ce_sae"], straight
    assert {"ce_sae_lora", "kl_sae_lora", "answer_acc_sae_lora", "answer_tokens"} <= set(straight)
    # interrupted during step 6 (after the checkpoint of step 4), resumed: the same adapter, bit for bit
    real, calls = answers.answer_losses, {"n": 0}

    def crash_at_step_6(*a, **kw):
        calls["n"] += torch.is_grad_enabled()
        if calls["n"] == 6:
            raise KeyboardInterrupt
        return real(*a, **kw)
    monkeypatch.setattr(answers, "answer_losses", crash_at_step_6)
    with pytest.raises(KeyboardInterrupt):
        adapt.main(args(files, tmp_path / "b"))
    monkeypatch.setattr(answers, "answer_losses", real)
    resumed = adapt.main(args(files, tmp_path / "b", "--resume"))
    a = torch.load(tmp_path / "a" / "ckpt.pt", weights_only=False)
    b = torch.load(tmp_path / "b" / "ckpt.pt", weights_only=False)
    assert a["step"] == b["step"]
    for x, y in zip(a["adapter"], b["adapter"]):
        assert torch.equal(x, y)
    assert resumed["answer_ce_sae_lora"] == straight["answer_ce_sae_lora"]


def test_kl_objective_reports_the_answers_too(files, tmp_path):
    res = adapt.main(args(files, tmp_path, "--objective", "kl", "--max-tokens", "256"))
    assert {"answer_ce_base", "answer_ce_sae", "answer_ce_sae_lora", "answer_acc_sae"} <= set(res)


def test_errors(files, tmp_path):
    with pytest.raises(ValueError, match="--objective ce trains on prompt / answer pairs: pass --pairs"):
        adapt.main([a for a in args(files, tmp_path / "x") if a not in ("--pairs", files["pairs"])])
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a", "answer": "b"}\n{"prompt": "a"}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:2: expected \{\"prompt\""):
        adapt.main(args(files, tmp_path / "y", "--pairs", str(bad)))
    with pytest.raises(ValueError, match="--objective sft: expected kl or ce"):
        adapt.main(args(files, tmp_path / "z", "--objective", "sft"))


def tutorial_commands():
    from tests.test_readme import ROOT, readme_commands
    return readme_commands(os.path.join(ROOT, "experiments", "pretrained_sae.md"))


@pytest.mark.parametrize("words", tutorial_commands(), ids=lambda w: " ".join(w)[:80])
def test_tutorial_commands_parse(words, monkeypatch):
    """experiments/pretrained_sae.md's commands, parsed by their scripts' own argument parsers (test_readme.py's check)."""
    from tests import test_readme
    assert words[0] in test_readme.PROGRAMS
    getattr(test_readme, "check_" + words[0])(words, monkeypatch)
