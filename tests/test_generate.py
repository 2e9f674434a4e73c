"""generate.py against transformers' generate (greedy and sampled; left-padded batches; Gemma-2's sliding window and
soft-caps, Gemma-3's QK-norm and two RoPE bases, Llama-3), against recomputing the full forward at every step (plain, with the SAE spliced everywhere, with
the authors' prompt-only splice, with LoRA adapters), and its stopping rules."""
import pytest
import torch

from evals.generate import complete, cut_at_stop, generate
from lora import adapters_disabled, apply_lora, lora_modules, merged
from model import Transformer
from sae import SAE
from evals.multiple_choice import hooks_for
from splice import splice_hooks
from fixtures.hf_refs import TINY_GEMMA2, TINY_GEMMA3, TINY_LLAMA3, make_hf_checkpoint

# init 0.05: weights small enough that greedy text is not one token repeated; the soft-caps still bend the logits
HUBS = {"gemma2": {**TINY_GEMMA2, "initializer_range": 0.05}, "gemma3": {**TINY_GEMMA3, "initializer_range": 0.05},
        "llama3": TINY_LLAMA3}
LENS = (13, 20, 5)  # two prompts longer than the tiny Gemma's sliding window (8); left-padded to 20 in a batch
NEW = 16
MARGIN = 1e-4  # top-2 logit gap every compared step must have (logits are O(1)): far above fp32 rounding, so the
# argmax cannot flip between implementations or CPUs and equal tokens are a real check


@pytest.fixture(scope="module", params=sorted(HUBS))
def pair(request, tmp_path_factory):
    folder = tmp_path_factory.mktemp(request.param)
    ref = make_hf_checkpoint(folder, HUBS[request.param])
    return ref, Transformer.from_pretrained(str(folder)), str(folder)


def prompts(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [[model.cfg.bos_token_id] + torch.randint(3, 512, (n - 1,), generator=g).tolist() for n in LENS]


def hf_generate(ref, ps, **kw):
    """transformers' generate on the left-padded batch (attention mask, pad 0); new tokens per row, cut after EOS."""
    P = max(map(len, ps))
    ids, mask = torch.zeros(len(ps), P, dtype=torch.long), torch.zeros(len(ps), P, dtype=torch.long)
    for r, p in enumerate(ps):
        ids[r, P - len(p):], mask[r, P - len(p):] = torch.tensor(p), 1
    out = ref.generate(input_ids=ids, attention_mask=mask, max_new_tokens=NEW, pad_token_id=0, top_p=1.0,
                       output_scores=True, return_dict_in_generate=True, **kw)
    eos = kw["eos_token_id"]
    new = [r[:r.index(eos) + 1] if eos in r else r for r in out.sequences[:, P:].tolist()]
    return new, torch.stack(out.scores, 1)  # scores (B, steps, vocab)


def check_margins(logits, rows):
    """logits (B, steps, vocab) of the reference; only the steps each row actually generated."""
    for r, toks in enumerate(rows):
        top2 = logits[r, :len(toks)].topk(2, -1).values
        assert (top2[:, 0] - top2[:, 1]).min() > MARGIN, "fixture too close to a tie for an exact token check"


def test_greedy_equals_transformers_token_for_token(pair):
    ref, ours, _ = pair
    ps = prompts(ours)
    free, _ = hf_generate(ref, ps, do_sample=False, eos_token_id=ref.config.eos_token_id)
    eos = free[0][5]  # a token row 0 writes at step 6: as EOS, row 0 stops there and the others run on
    hf, scores = hf_generate(ref, ps, do_sample=False, eos_token_id=eos)
    check_margins(scores, hf)
    assert len(hf[0]) <= 6 and max(map(len, hf)) == NEW and len(set(map(tuple, hf))) == 3
    assert generate(ours, ps, NEW, eos=eos) == hf


def test_sampling_equals_transformers_with_the_same_seed(pair):
    ref, ours, _ = pair
    ps = prompts(ours, seed=1)
    torch.manual_seed(7)
    hf, _ = hf_generate(ref, ps, do_sample=True, temperature=0.7, top_k=20, eos_token_id=ref.config.eos_token_id)
    torch.manual_seed(7)
    assert generate(ours, ps, NEW, temperature=0.7, top_k=20) == hf
    greedy = generate(ours, ps, NEW)
    assert hf != greedy and generate(ours, ps, NEW, temperature=1.0, top_k=1) == greedy


def recompute(model, ps, hooks_for_step, steps=NEW):
    """nanoGPT's generate without a cache: each prompt alone (no padding), the full forward at every step, with
    hooks_for_step(idx, prompt_len) as the hooks. Returns new tokens per prompt and the logits (B, steps, vocab)."""
    rows, logits = [], []
    with torch.no_grad():
        for p in ps:
            idx, ls = torch.tensor([p]), []
            for _ in range(steps):
                ls.append(model(idx, hooks=hooks_for_step(idx, len(p)))[0, -1])
                idx = torch.cat([idx, ls[-1].argmax().view(1, 1)], 1)
            rows.append(idx[0, len(p):].tolist())
            logits.append(torch.stack(ls))
    return rows, torch.stack(logits)


def test_cache_equals_recomputing_the_full_forward(pair):
    _, ours, _ = pair
    ps = prompts(ours, seed=2)
    want, logits = recompute(ours, ps, lambda idx, n: {})
    check_margins(logits, want)
    assert generate(ours, ps, NEW, eos=()) == want
    assert [generate(ours, [p], NEW, eos=())[0] for p in ps] == want  # batched = one by one


def crude_sae(model, layer=1, seed=0):
    torch.manual_seed(seed)
    return SAE(model.cfg.d_model, 4 * model.cfg.d_model, "topk", k=8, layer=layer).eval()


def test_spliced_cache_equals_the_full_spliced_forward_at_every_step(pair):
    _, ours, _ = pair
    ps = prompts(ours, seed=6)
    saes, keep = [(1, crude_sae(ours))], (ours.cfg.bos_token_id,)
    plain, _ = recompute(ours, ps, lambda idx, n: {})
    want, logits = recompute(ours, ps, lambda idx, n: splice_hooks(saes, idx, keep))
    check_margins(logits, want)
    assert want != plain  # the SAE changes what is written
    assert generate(ours, ps, NEW, eos=(), hooks_for=hooks_for(saes, keep)) == want

    def prompt_only(idx, n):  # the authors' run: the SAE on the prompt's positions, generated ones untouched
        splice = splice_hooks(saes, idx[:, :n], keep)[1]
        return {1: lambda x: torch.cat([splice(x[:, :n]), x[:, n:]], 1)}
    authors, logits = recompute(ours, ps, prompt_only)
    check_margins(logits, authors)
    assert authors != want and authors != plain
    assert generate(ours, ps, NEW, eos=(), hooks_for=hooks_for(saes, keep), splice_generated=False) == authors


def test_adapters_on_off_and_merged(pair):
    _, base, folder = pair
    model = Transformer.from_pretrained(folder)
    apply_lora(model, rank=4, alpha=8, layers="all")
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for m in lora_modules(model).values():
            m.lora_B.copy_(torch.randn(m.lora_B.shape, generator=gen) * 0.2)
    ps = prompts(base, seed=4)
    want, logits = recompute(model, ps, lambda idx, n: {})
    check_margins(logits, want)
    assert want != generate(base, ps, NEW, eos=())
    assert generate(model, ps, NEW, eos=()) == want
    with merged(model):
        assert generate(model, ps, NEW, eos=()) == want
    with adapters_disabled(model):
        assert generate(model, ps, NEW, eos=()) == generate(base, ps, NEW, eos=())


class CharTok:
    """One character per token: a..z cycle over the ids, BOS and EOS decode to nothing."""
    bos_id, eos_id = 1, 2

    def encode(self, text):
        return [3 + ord(c) % 500 for c in text]

    def decode(self, ids):
        return "".join(chr(ord("a") + i % 26) for i in ids if i not in (self.bos_id, self.eos_id))


def test_stop_strings_eos_and_prompt_truncation(pair):
    _, ours, _ = pair
    tok, ps = CharTok(), prompts(ours, seed=5)
    free = generate(ours, ps, NEW, eos=())
    text = tok.decode(free[0])
    stop = text[6:8]
    first = text.index(stop)

    def until_stop(row):  # a row ends on the token that completes the stop string's first occurrence
        return next((row[:m] for m in range(1, len(row) + 1) if stop in tok.decode(row[:m])), row)
    got = generate(ours, ps, NEW, eos=(), stop=[stop], decode=tok.decode)
    assert got[0] == free[0][:first + 2] and got == [until_stop(r) for r in free]
    assert cut_at_stop(text, ["zz", stop]) == text[:first] and cut_at_stop(text, []) == text

    # complete(): strings in, BOS added, EOS dropped, cut at the stop string; EOS ends a row
    prompt = "".join(chr(ord("a") + (t - 3) % 26) for t in ps[0][1:])
    ids = [tok.bos_id] + tok.encode(prompt)
    row = generate(ours, [ids], NEW, eos=())[0]
    assert complete(ours, tok, [prompt], NEW, stop=[]) == [tok.decode(row)]
    ours.cfg.eos_token_id = row[3]
    try:
        assert generate(ours, [ids], NEW)[0] == row[:row.index(row[3]) + 1]
        assert complete(ours, tok, [prompt], NEW) == [tok.decode(row[:row.index(row[3])])]
    finally:
        ours.cfg.eos_token_id = HUBS["gemma2" if ours.cfg.sliding_window else "llama3"]["eos_token_id"]
    # a prompt longer than the context loses tokens from the left, BOS kept
    long = prompt * 40
    room = ours.cfg.max_seq_len - NEW - 1
    cut = [tok.bos_id] + tok.encode(long)[-room:]
    assert complete(ours, tok, [long], NEW) == [tok.decode(generate(ours, [cut], NEW)[0])]
    with pytest.raises(ValueError, match="exceeds the model's context"):
        generate(ours, [cut + [5]], NEW)
