"""--skip-norm-above: positions whose activation norm is above a multiple of their window's median keep their original
activation (the Qwen3 SAE card's rule for attention sinks), written plainly here and compared with the splice; the same
rule in adapt.py's training step and held-out evaluation and in eval.py, with the counts they report."""
import json

import pytest
import torch
import torch.nn.functional as F

import adapt
import eval as eval_py
from model import Transformer
from formats.sae_files import load_saes
from splice import splice_hooks, unspliced_tokens
from tests.test_adapt import files, small_args  # noqa: F401  (the module fixture and the flags of a small run)
from fixtures.tiny import BOS, identity_sae


def reference_keep(x, idx, mult, unspliced_ids):
    """The card's rule as written: per window, norm_t > mult x median_t' norm_t'; BOS kept as before."""
    norms = torch.linalg.vector_norm(x.double(), dim=-1)
    med = torch.stack([row.median() for row in norms])[:, None]
    return (norms > mult * med) | torch.isin(idx, torch.tensor(unspliced_ids))


def test_rule_keeps_high_norm_positions_and_bos():
    g = torch.Generator().manual_seed(0)
    idx = torch.randint(3, 512, (2, 12), generator=g)
    idx[:, 0] = BOS
    x = torch.randn(2, 12, 64, generator=g)
    x[0, 5] *= 30  # a sink
    x[1, 7] *= 30
    sae = identity_sae()
    with torch.no_grad():
        sae.W_dec.mul_(0.5)  # a "reconstruction" that halves its input: kept positions are told apart from it
    cfg = type("C", (), dict(bos_token_id=BOS, eos_token_id=2))()
    kept = unspliced_tokens([(1, sae)], cfg, "no_bos", norm_above=10)
    skipped = []
    out = splice_hooks([(1, sae)], idx, kept, skipped)[1](x)
    keep = reference_keep(x, idx, 10, [BOS])
    assert keep.sum() == 4 and keep[0, 5] and keep[1, 7]
    torch.testing.assert_close(out, torch.where(keep[..., None], x, 0.5 * x))
    assert skipped[0].sum() == 2  # the rule's own positions, BOS not among them
    with pytest.raises(ValueError, match="--skip-norm-above 0"):
        unspliced_tokens([(1, sae)], type("C", (), dict(bos_token_id=BOS, eos_token_id=2))(), "no_bos", norm_above=0)


def first_batch_kl_with_rule(files, mult, batch=4, seq_len=32):  # noqa: F811
    """Eq. 7 on adapt.py's first training batch by hand: full logits, the SAE at its layer except at BOS and at the
    rule's positions (where the spliced model reads them: the stream after block 1)."""
    from data import TokenLoader
    model = Transformer.from_pretrained(files["model"])
    [(layer, sae)] = load_saes([files["sae"]], None, model, "cpu")
    idx = TokenLoader(files["data"], "train", batch, seq_len, 0, 1, 0).next_batch()

    def hook(x):
        return torch.where(reference_keep(x, idx, mult, [BOS])[..., None], x, sae(x))
    with torch.no_grad():
        lp_orig = F.log_softmax(model(idx)[:, :-1].double(), -1)
        lp = F.log_softmax(model(idx, hooks={layer: hook})[:, :-1].double(), -1)
    return (lp_orig.exp() * (lp_orig - lp)).sum(-1)


def test_adapt_trains_and_evaluates_with_the_rule_and_eval_py_agrees(files, tmp_path):  # noqa: F811
    # multiple 1.0: about half the positions are above their window's median, so the rule surely bites
    res = adapt.main(small_args(files, tmp_path / "run", "--max-tokens", "256", "--log-interval", "1",
                                "--skip-norm-above", "1.0"))
    kl = first_batch_kl_with_rule(files, 1.0)
    row = next(h for h in res["history"] if "loss" in h)
    assert row["train_kl"] == pytest.approx(kl.mean().item(), rel=1e-4)
    without = adapt.main(small_args(files, tmp_path / "plain", "--max-tokens", "256", "--log-interval", "1"))
    assert next(h for h in without["history"] if "loss" in h)["train_kl"] != pytest.approx(row["train_kl"], rel=1e-3)
    # the held-out count: about half of the 4 x 4 x 31 predicted positions, BOS not counted by the rule
    assert 0.3 * res["positions"] < res["norm_skipped_sae"] < 0.7 * res["positions"], res
    assert "norm_skipped_sae" not in without
    eval_py.main(["--model", files["model"], "--data", files["data"], "--sae", files["sae"], "--adapter",
                  str(tmp_path / "run" / "adapter"), "--out", str(tmp_path / "eval"), "--seq-len", "32",
                  "--batch-size", "4", "--eval-tokens", "512", "--autocast", "float32", "--plots", "false",
                  "--distances", "false", "--skip-norm-above", "1.0"])
    e = json.load(open(tmp_path / "eval" / "eval.json"))["groups"][0]
    assert e["norm_skipped"] == {"sae": res["norm_skipped_sae"], "sae_lora": res["norm_skipped_sae_lora"]}
    assert e["settings"]["sae_lora"]["ce"] == pytest.approx(res["ce_sae_lora"], rel=1e-6)
