"""eval.py with a transcoder and with an SAE inside a block, as a user types it on the embedded tiny model:
`python train_sae.py --transcoder` (its tiny preset, fewer tokens), then `python eval.py --sae ... --adapter ...`.
The reference is a plain recomputation: the block's MLP sublayer (or o_proj's input) overridden by the transcoder
(the SAE) at every non-BOS position, full logits, F.cross_entropy and F.kl_div; greedy text by the full forward."""
import json
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from data import TokenLoader
from formats.tokenizer import load_tokenizer
from formats.peft import save_adapter
from lora import adapters_disabled, apply_lora, lora_modules, merged
from model import Transformer
from sae import SAE

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SEQ, BATCH, TOKENS, NEW, PROMPT = 64, 4, 2048, 8, "def main("


def cli(tmp_path, *args):
    env = {**os.environ, "LORASAE_CACHE": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)


def eval_cli(tmp_path, out, *args):
    proc = cli(tmp_path, "eval.py", *args, "--eval-tokens", str(TOKENS), "--seq-len", str(SEQ), "--batch-size",
               str(BATCH), "--autocast", "float32", "--plots", "false", "--out", str(tmp_path / out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.load(open(tmp_path / out / "eval.json"))


class Spliced(torch.nn.Module):
    """fn(x) in place of x at the positions not kept, then `inner` (o_proj with an SAE on its input)."""

    def __init__(self, inner, fn, unspliced_at):
        super().__init__()
        self.inner, self.fn, self.unspliced_at = inner, fn, unspliced_at

    def forward(self, x):
        return self.inner(torch.where(self.unspliced_at, x, self.fn(x)))


def reference(model, batches, bos, splice):
    """CE and KL sums per setting over the predicted positions; splice(idx) is a context that overrides the block."""
    ce, kl = {}, {}
    with torch.no_grad():
        for idx in batches:
            with adapters_disabled(model):
                logits = {"original": model(idx)}
                with splice(idx):
                    logits["sae"] = model(idx)
            if lora_modules(model):
                with merged(model):
                    logits["lora"] = model(idx)
                    with splice(idx):
                        logits["sae_lora"] = model(idx)
            logp0 = F.log_softmax(logits["original"][:, :-1], -1)
            for k, v in logits.items():
                ce[k] = ce.get(k, 0) + F.cross_entropy(v[:, :-1].flatten(0, 1), idx[:, 1:].flatten(),
                                                       reduction="sum").item()
                kl[k] = kl.get(k, 0) + F.kl_div(F.log_softmax(v[:, :-1], -1), logp0, log_target=True,
                                                reduction="sum").item()
    return ce, kl


def check_table(group, ce, kl):
    n = group["positions"]
    assert n == TOKENS // SEQ * (SEQ - 1)
    for k, v in group["settings"].items():
        assert v["ce"] == pytest.approx(ce[k] / n, rel=1e-5), k
        assert v["kl"] == pytest.approx(kl[k] / n, rel=1e-4, abs=1e-7), k


class override:
    """with override(obj, name, value): obj.name = value inside, restored after."""

    def __init__(self, obj, name, value):
        self.obj, self.name, self.value = obj, name, value

    def __enter__(self):
        self.old = getattr(self.obj, self.name)
        setattr(self.obj, self.name, self.value)

    def __exit__(self, *exc):
        setattr(self.obj, self.name, self.old)
        if self.name == "mlp_out":
            delattr(self.obj, "mlp_out")  # back to the class's method


def greedy(model, tok, splice):
    """BOS + the prompt, the full forward at every step with the splice; decoded as eval.py's complete does."""
    idx = torch.tensor([[tok.bos_id] + tok.encode(PROMPT)])
    with torch.no_grad():
        for _ in range(NEW):
            with splice(idx):
                top = model(idx)[0, -1].topk(2)
            assert top.values[0] - top.values[1] > 1e-4  # no near-tie: equal text is a real check
            idx = torch.cat([idx, top.indices[:1].view(1, 1)], 1)
    return tok.decode([t for t in idx[0, -NEW:].tolist() if t != tok.eos_id])


def test_train_a_transcoder_then_eval_it_with_an_adapter_and_an_attention_sae(tmp_path):
    proc = cli(tmp_path, "train_sae.py", "--transcoder", "--max-tokens", "16384", "--buffer-tokens", "16384",
               "--out", str(tmp_path / "tc"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    tc = SAE.from_pretrained(str(tmp_path / "tc")).requires_grad_(False)
    model_dir = json.load(open(tmp_path / "tc" / "cfg.json"))["metadata"]["model_name"]  # the embedded model
    model = Transformer.from_pretrained(model_dir).requires_grad_(False)
    apply_lora(model, rank=4, alpha=8, layers="all")
    with torch.no_grad():
        for m in lora_modules(model).values():
            m.lora_B.normal_(0, 0.05, generator=torch.Generator().manual_seed(1))
    save_adapter(model, str(tmp_path / "adapter"), model_dir)
    res = eval_cli(tmp_path, "ev", "--sae", str(tmp_path / "tc"), "--adapter", str(tmp_path / "adapter"),
                   "--generate", PROMPT, "--gen-tokens", str(NEW))
    assert res["model"] == model_dir and res["saes"][0]["site"] == "transcoder"
    loader = TokenLoader(res["config"]["data"], "test", BATCH, SEQ, shuffle=False)
    batches = [loader.next_batch() for _ in range(TOKENS // (BATCH * SEQ))]
    bos, layer = model.cfg.bos_token_id, tc.layer
    block = model.model.layers[layer]

    def splice(idx):  # the MLP sublayer replaced by the transcoder of its normalised input, BOS kept (SAELens files)
        return override(block, "mlp_out", lambda h: torch.where((idx == bos)[..., None], type(block).mlp_out(block, h),
                                                                 tc(h)))
    ce, kl = reference(model, batches, bos, splice)
    g = res["groups"][0]
    check_table(g, ce, kl)
    assert g["settings"]["sae"]["ce"] > g["settings"]["original"]["ce"]
    assert g["per_token"]["mean_change"] == pytest.approx((ce["sae_lora"] - ce["sae"]) / g["positions"], abs=1e-5)

    # FVU against the MLP sublayer's output, L0 of the transcoder's codes, on the original model's non-BOS positions
    seen = []
    with torch.no_grad(), adapters_disabled(model), override(
            block, "mlp_out", lambda h: seen.append((h, type(block).mlp_out(block, h))) or seen[-1][1]):
        for idx in batches:
            model(idx, stop_at=layer)
            seen[-1] = tuple(t[idx != bos] for t in seen[-1])
        h, y = (torch.cat(t) for t in zip(*seen))
        fvu = (y - tc(h)).pow(2).sum() / (y - y.mean(0)).pow(2).sum()
        l0 = (tc.encode(h) != 0).sum(1).float().mean()
    st = g["sae_stats"][0]
    assert st["site"] == "transcoder" and st["replaced"] == len(h)
    assert st["fvu"] == pytest.approx(fvu.item(), rel=1e-4) and st["l0"] == pytest.approx(l0.item())
    assert f"| adapter | {layer} | transcoder | topk |" in open(tmp_path / "ev" / "eval.md").read()

    # generation: the SAE settings write what the full spliced forward writes greedily
    tok = load_tokenizer(model_dir)
    with adapters_disabled(model):
        assert res["generations"]["sae"] == [greedy(model, tok, splice)]
    with merged(model):
        assert g["generations"]["sae_lora"] == [greedy(model, tok, splice)]

    # an SAE on block 1's attention heads (blocks.1.attn.hook_z, o_proj's input), no adapter
    d = model.cfg.n_head * model.cfg.head_dim
    torch.manual_seed(0)
    sae = SAE(d, 4 * d, "topk", k=8, layer=1)
    sae.hook_name = "blocks.1.attn.hook_z"
    sae.save(str(tmp_path / "attn"))
    res = eval_cli(tmp_path, "ev-attn", "--sae", str(tmp_path / "attn"))
    unadapted = Transformer.from_pretrained(model_dir)
    attn = unadapted.model.layers[1].self_attn

    def splice_z(idx):
        return override(attn, "o_proj", Spliced(attn.o_proj, sae, (idx == bos)[..., None]))
    ce, kl = reference(unadapted, batches, bos, splice_z)
    check_table(res["groups"][0], ce, kl)
    assert res["groups"][0]["sae_stats"][0]["site"] == "attn_z" and ce["sae"] > ce["original"]
    proc = cli(tmp_path, "eval.py", "--sae", str(tmp_path / "attn"), "--saebench", "--out", str(tmp_path / "sb"))
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and lines[-1].startswith("eval.py: error: --saebench: needs a residual-stream SAE") \
        and "attn.hook_z" in lines[-1], proc.stderr[-2000:]
