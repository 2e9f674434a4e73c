"""
Decoding: text generation with a key/value cache for model.py's Transformer, nanoGPT's `generate` loop.

    new = generate(model, [[bos, 5, 9], [bos, 7]], max_new_tokens=20)                 # greedy, token ids
    new = generate(model, prompts, 20, temperature=0.8, top_k=50, generator=g)          # sampled
    new = generate(model, prompts, 20, hooks_for=splice.hooks_for(saes, unspliced_ids))  # the SAE spliced everywhere
    texts = complete(model, tok, ["Q: ..."], 256, stop=["\n\n"])                         # strings in, strings out

The prompts run once (prefill); each later step feeds only the newest token, whose keys and values are appended to
the cache, so a step costs one position instead of the whole sequence. Prompts of different lengths are padded on the
left, so every row writes its next token into the same cache slot; pad slots are never attended to, and positions
(RoPE) count a row's real tokens only, as transformers' generate does with an attention mask.

Hooks (the SAE splice, the paper's Sec. 3) run on every chunk the model processes: the prompt and each generated token,
so the spliced model is the one that writes the text. splice_generated=False runs them on the prompt only, which is
what the authors' lm-eval run measured: their forward hook leaves position 0 of every call unspliced (the BOS token,
eval/benchmarks/run_benchmarks.py), and cached decoding calls the model on one position at a time.
"""
from __future__ import annotations

import contextlib
from typing import Callable, Sequence

import torch
import torch.nn.functional as F

from plumbing import common
from model import Transformer, block_hooks, rope_tables

HooksFor = Callable[[torch.Tensor], dict]  # token ids of the chunk being run -> {layer or (site, layer): hook}


class KVCache:
    """Every layer's keys and values, (batch, n_kv_head, capacity, head_dim), filled left to right. `valid` (batch,
    capacity) marks the slots that hold real tokens (False at left padding)."""

    def __init__(self, model: Transformer, valid: torch.Tensor, capacity: int):
        self.cfg, self.length = model.cfg, 0
        self.valid = torch.zeros(valid.shape[0], capacity, dtype=torch.bool, device=valid.device)
        self.valid[:, :valid.shape[1]] = valid
        self.k: list[torch.Tensor | None] = [None] * model.cfg.n_layer
        self.v: list[torch.Tensor | None] = [None] * model.cfg.n_layer

    def append(self, layer: int, k: torch.Tensor, v: torch.Tensor):
        """Store the chunk's keys and values at slots length.. and return every filled slot's."""
        if self.k[layer] is None:  # allocated on first use, in the dtype the projections produce (autocast)
            shape = (*k.shape[:2], self.valid.shape[1], k.shape[3])
            self.k[layer], self.v[layer] = k.new_zeros(shape), v.new_zeros(shape)
        end = self.length + k.shape[2]
        self.k[layer][:, :, self.length:end] = k
        self.v[layer][:, :, self.length:end] = v
        return self.k[layer][:, :, :end], self.v[layer][:, :, :end]

    def masks(self, T: int) -> dict:
        """{window: (B, 1, T, S) bool} for a chunk of T new tokens: slot j is seen from slot i if it holds a real token,
        j <= i, and within a sliding layer's window (i - window < j). Left padding keeps a row's real tokens
        contiguous, so distances in slots are distances in positions. A pad slot sees itself: no row is all -inf."""
        S = self.length + T
        i = torch.arange(self.length, S, device=self.valid.device)[:, None]
        j = torch.arange(S, device=self.valid.device)[None, :]
        seen = (j <= i) & self.valid[:, None, :S]
        out = {None: seen | (j == i)}
        w = self.cfg.sliding_window
        if w is not None and "sliding_attention" in self.cfg.layer_types:
            out[w] = (seen & (j > i - w)) | (j == i)
        return {w: m[:, None] for w, m in out.items()}


def _heads(attn, x, cos, sin, cache: KVCache, layer: int, mask):
    # model.Attention.heads (projections, QK-norm, RoPE, soft-cap) over the cached keys and values: o_proj's input
    B, T, _ = x.shape
    q, k, v = attn.qkv(x, cos, sin)
    k, v = cache.append(layer, k, v)
    if attn.cfg.attn_softcap is None:
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=attn.scale,
                                           enable_gqa=attn.n_kv_head != attn.n_head)
    else:
        rep = attn.n_head // attn.n_kv_head
        k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        cap = attn.cfg.attn_softcap
        scores = torch.tanh((q @ k.transpose(-2, -1)) * attn.scale / cap) * cap
        y = F.softmax(scores.masked_fill(~mask, float("-inf")), dim=-1, dtype=torch.float32).to(q.dtype) @ v
    return y.transpose(1, 2).reshape(B, T, attn.n_head * attn.head_dim)


def forward_cached(model: Transformer, idx: torch.Tensor, pos: torch.Tensor, cache: KVCache, rope, hooks: dict):
    """Logits (B, vocab) of the last of T new tokens idx (B, T) at RoPE positions pos (B, T), whose keys and values
    go into cache slots cache.length.. . hooks[L] replaces the new positions' stream after block L, hooks[site, L] an
    activation inside block L (model.Block.forward: its own code, with the cached attention)."""
    T = idx.shape[1]
    x = model.embed(idx)
    tables = {local: (cos[pos][:, None].to(x.dtype), sin[pos][:, None].to(x.dtype))
              for local, (cos, sin) in rope.items()}
    masks = cache.masks(T)
    inside = block_hooks(hooks)
    for i, block in enumerate(model.model.layers):
        cos, sin = tables[block.self_attn.local_rope]
        mask = masks[block.self_attn.window]
        x = block(x, cos, sin, inside.get(i),
                  attn_heads=lambda h, b=block, c=cos, s=sin, m=mask, i=i: _heads(b.self_attn, h, c, s, cache, i, m))
        if i in hooks:
            x = hooks[i](x)
    cache.length += T
    return model.head(x[:, -1]).float()


def sample(logits: torch.Tensor, temperature: float = 0.0, top_k: int | None = None, generator=None) -> torch.Tensor:
    """The next token of each row: argmax at temperature 0; else a draw from softmax(logits / temperature) over the
    top_k most likely tokens (transformers' temperature then top-k warpers, then torch.multinomial)."""
    if temperature == 0:
        return logits.argmax(-1)
    logits = logits / temperature
    if top_k is not None:
        kth = torch.topk(logits, min(top_k, logits.shape[-1])).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    return torch.multinomial(F.softmax(logits, dim=-1), 1, generator=generator)[:, 0]


def _ids(x) -> tuple[int, ...]:
    return tuple(i for i in (x if isinstance(x, (list, tuple)) else [x]) if i is not None)


@torch.no_grad()
def generate(model: Transformer, prompts: Sequence[Sequence[int]], max_new_tokens: int, *, temperature: float = 0.0,
             top_k: int | None = None, eos=(), stop: Sequence[str] = (), decode: Callable | None = None,
             hooks_for: HooksFor | None = None, splice_generated: bool = True, generator=None) -> list[list[int]]:
    """The new tokens of each prompt (token ids, BOS first if the model wants one): at most max_new_tokens, ending
    with an EOS token (eos: an id or ids; () means the model's own) or once decode(new tokens) contains a stop
    string. Rows that finish early wait (their later tokens are not returned) until all have finished."""
    cfg, B = model.cfg, len(prompts)
    if B == 0:
        return []
    if min(map(len, prompts)) == 0:
        raise ValueError("an empty prompt: every prompt needs at least one token (BOS)")
    if temperature < 0 or (top_k is not None and top_k < 1) or max_new_tokens < 1:
        raise ValueError(f"temperature {temperature}, top_k {top_k}, max_new_tokens {max_new_tokens}: need "
                         f"temperature >= 0, top_k >= 1 and at least one new token")
    if stop and decode is None:
        raise ValueError("stop strings need decode (token ids -> text)")
    P = max(map(len, prompts))
    if P + max_new_tokens > cfg.max_seq_len:
        raise ValueError(f"a {P}-token prompt plus {max_new_tokens} new tokens exceeds the model's context "
                         f"({cfg.max_seq_len}): shorten the prompt or generate fewer tokens")
    dev = model.model.embed_tokens.weight.device
    pad = cfg.pad_token_id if cfg.pad_token_id is not None else 0
    idx = torch.full((B, P), pad, dtype=torch.long)
    for r, p in enumerate(prompts):
        idx[r, P - len(p):] = torch.as_tensor(list(p), dtype=torch.long)
    idx = idx.to(dev)
    lens = torch.tensor([len(p) for p in prompts], device=dev)
    valid = torch.arange(P, device=dev)[None, :] >= (P - lens)[:, None]
    cache = KVCache(model, valid, P + max_new_tokens)
    rope = rope_tables(cfg, P + max_new_tokens, dev, torch.float32)
    eos_ids = set(_ids(eos) or _ids(cfg.eos_token_id))
    def hooks(chunk):
        return hooks_for(chunk) if hooks_for is not None else {}
    model._check_layers(hooks(idx[:, :1]), None)  # a layer the model lacks: one line, not silently unspliced

    logits = forward_cached(model, idx, (valid.cumsum(1) - 1).clamp_min(0), cache, rope, hooks(idx))
    out, done, pos = [[] for _ in range(B)], [False] * B, lens.clone()
    for step in range(max_new_tokens):
        tok = sample(logits, temperature, top_k, generator)
        for r, t in enumerate(tok.tolist()):
            if not done[r]:
                out[r].append(t)
                done[r] = t in eos_ids or bool(stop) and any(s in decode(out[r]) for s in stop)
        if all(done) or step == max_new_tokens - 1:
            break
        cache.valid[:, cache.length] = True
        chunk = tok[:, None]
        logits = forward_cached(model, chunk, pos[:, None], cache, rope, hooks(chunk) if splice_generated else {})
        pos += 1
    return out


def cut_at_stop(text: str, stop: Sequence[str]) -> str:
    """The text before the first stop string (lm-eval's generate_until post-processing: split on each in turn)."""
    for s in stop:
        if s:
            text = text.split(s)[0]
    return text


def complete(model: Transformer, tok, prompts: Sequence[str], max_new_tokens: int, *, stop: Sequence[str] = (),
             batch_size: int = 16, autocast_ctx=None, hooks_for: HooksFor | None = None, splice_generated: bool = True,
             temperature: float = 0.0, top_k: int | None = None, generator=None, progress=None) -> list[str]:
    """The continuation of each prompt: BOS + its tokens (cut from the left to leave room for max_new_tokens, BOS
    kept), batched longest first as lm-eval does; decoded without its EOS and cut before the first stop string."""
    room = model.cfg.max_seq_len - max_new_tokens - 1
    if room < 1:
        raise ValueError(f"{max_new_tokens} new tokens leave no room for a prompt in the model's context "
                         f"({model.cfg.max_seq_len})")
    ids = [[tok.bos_id] + e[max(0, len(e) - room):] for e in (tok.encode(p) for p in prompts)]
    order = sorted(range(len(ids)), key=lambda i: -len(ids[i]))
    eos = set(_ids(model.cfg.eos_token_id)) | {tok.eos_id}
    n_text = getattr(tok, "vocab_size", float("inf"))  # ids past the tokenizer's (a padded embedding) have no text

    def decode(new):
        return tok.decode([t for t in new if t < n_text and t not in eos])
    texts = [""] * len(ids)
    for b in range(0, len(order), batch_size):
        rows = order[b:b + batch_size]
        with autocast_ctx or contextlib.nullcontext():
            new = generate(model, [ids[i] for i in rows], max_new_tokens, temperature=temperature, top_k=top_k,
                           eos=tuple(eos), stop=stop, decode=decode, hooks_for=hooks_for,
                           splice_generated=splice_generated, generator=generator)
        for i, n in zip(rows, new):
            texts[i] = cut_at_stop(decode(n), stop)
        if progress:
            progress.step()
    return texts


def complete_setting(model, tok, prompts, setting: str, saes, unspliced_ids=(), *, prompt_only: bool = False, **kw):
    """complete() in one of the paper's settings (Sec. 5.3): adapters on for *lora, off otherwise; the SAEs spliced
    for sae*, on every position or (prompt_only, the authors' run) on the prompt's only."""
    from evals.multiple_choice import hooks_for, setting_context  # the settings of Sec. 5.3
    with setting_context(model, setting):
        return complete(model, tok, prompts, hooks_for=hooks_for(saes, unspliced_ids) if "sae" in setting else None,
                        splice_generated=not prompt_only, **kw)


def check_args(cfg, max_seq_len: int):
    """eval.py's generation flags, before any model work: one line for a bad value. --gen-tokens is lowered to half
    the model's context where it asks for more, so that a prompt keeps the other half."""
    if cfg.gen_tokens < 1:
        raise ValueError(f"--gen-tokens {cfg.gen_tokens}: need at least 1")
    if cfg.gen_tokens > max_seq_len // 2:
        common.log(f"--gen-tokens {cfg.gen_tokens} lowered to {max_seq_len // 2}: half of the model's {max_seq_len}-"
                   f"token context, the other half for the prompt")
        cfg.gen_tokens = max_seq_len // 2
    if cfg.temperature < 0 or (cfg.top_k is not None and cfg.top_k < 1):
        raise ValueError(f"--temperature {cfg.temperature} --top-k {cfg.top_k}: need a temperature >= 0 (0: greedy) "
                         f"and top-k >= 1")


def show(model, tok, prompts, settings, saes, unspliced_ids, cfg, autocast_ctx) -> dict:
    """eval.py --generate: what each setting writes after each prompt, printed and returned as {key: [text, ...]}; the
    key is the setting, with "_prompt_only" added for the authors' splice (cfg.authors_splice)."""
    room = model.cfg.max_seq_len - cfg.gen_tokens - 1  # what complete() keeps of a prompt, beside BOS
    for i, p in enumerate(prompts):
        n = len(tok.encode(p))
        if n > room and settings[0] == "original":  # said once: eval.py shows the base settings first
            common.log(f"--generate prompt {i + 1}: {n} tokens, more than the {room} the model's "
                       f"{model.cfg.max_seq_len}-token context leaves beside BOS and --gen-tokens {cfg.gen_tokens}: "
                       f"its first {n - room} tokens are cut")
    out = {}
    for s in settings:
        for prompt_only in (False, True) if cfg.authors_splice and "sae" in s else (False,):
            key = s + ("_prompt_only" if prompt_only else "")
            gen = torch.Generator(model.model.embed_tokens.weight.device).manual_seed(cfg.seed)  # same draws each
            out[key] = complete_setting(model, tok, prompts, s, saes, unspliced_ids, prompt_only=prompt_only,
                                        autocast_ctx=autocast_ctx, max_new_tokens=cfg.gen_tokens,
                                        temperature=cfg.temperature, top_k=cfg.top_k, generator=gen,
                                        batch_size=cfg.bench_batch)
            for p, t in zip(prompts, out[key]):
                print(f"[{key}] {p}{t}", flush=True)
    return out


def markdown(res: dict) -> list[str]:
    """eval.md's section for --generate: per prompt, what each setting wrote (Python string literals)."""
    L = ["", "## Generations (--generate)", ""]
    rows = [("", k, v) for k, v in res["generations"].items()]
    rows += [(g["name"], k, v) for g in res["groups"] for k, v in g.get("generations", {}).items()]
    for i, prompt in enumerate(res["config"]["generate"]):
        L += [f"Prompt {i + 1}: `{prompt!r}`", ""]
        L += [f"- {k}{f' ({name})' if name else ''}: `{texts[i]!r}`" for name, k, texts in rows] + [""]
    return L
