"""
Gemma-2, Gemma-3 (text), Llama-3, Qwen2.5 and Qwen3 (dense) decoder-only transformers in one file, written from
scratch.

All five families are one `Transformer` driven by explicit `ModelConfig` fields (never by a model's name), with
parameter names identical to Hugging Face's, so a hub checkpoint loads with a plain strict `load_state_dict`:

    model = Transformer.from_pretrained("google/gemma-2-2b")        # or a local folder
    logits = model(idx)                                              # (B, T) -> (B, T, vocab)
    logits = model(idx, hooks={12: sae})                             # splice an SAE after block 12
    logits = model(idx, hooks={("mlp_out", 12): sae})                # ... or on block 12's MLP output (Block.forward)
    resid  = model(idx, stop_at=12)                                  # residual stream after block 12

"After block L" is the residual stream HF calls `hidden_states[L + 1]` and SAELens `blocks.L.hook_resid_post`.
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from formats.checkpoint import (config_from_hf, config_to_hf, load_checkpoint, read_config, resolve_model_dir,
                                save_checkpoint)


# ----------------------------------------------------------------------------------------------------------------------
# Configuration


@dataclass
class ModelConfig:
    vocab_size: int = 256
    d_model: int = 64
    d_ff: int = 128
    n_layer: int = 2
    n_head: int = 4
    n_kv_head: int = 2
    head_dim: int = 16
    norm_eps: float = 1e-6
    norm_offset: bool = False  # Gemma's RMSNorm scales by (1 + w) and stores w around 0; Llama's by w
    sandwich_norms: bool = False  # Gemma-2 / -3: extra norms after attention and after the MLP (four per block)
    embed_scale: bool = False  # Gemma: embeddings multiplied by sqrt(d_model)
    mlp_act: str = "silu"  # "silu" (SwiGLU, Llama) or "gelu_tanh" (GeGLU, Gemma)
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None  # Llama-3.1's {"rope_type": "llama3", "factor", "low_freq_factor", ...};
    # Gemma-3's {"rope_type": "linear", "factor"} (global layers only)
    rope_local_theta: float | None = None  # Gemma-3: RoPE base of the sliding layers (rope_theta: the global ones)
    qk_norm: bool = False  # Gemma-3, Qwen3: an RMSNorm over each head's queries and keys, before RoPE
    query_pre_attn_scalar: float | None = None  # attention scale is this ** -0.5; None means head_dim
    attn_softcap: float | None = None  # Gemma-2: cap * tanh(scores / cap) before the softmax
    final_softcap: float | None = None  # Gemma-2: same on the output logits
    sliding_window: int | None = None
    layer_types: list[str] | None = None  # per layer "full_attention" or "sliding_attention"
    tie_embeddings: bool = True
    attention_bias: bool = False  # biases on q, k, v and o_proj (Llama's and Qwen3's config key)
    qkv_bias: bool = False  # Qwen2 / Qwen2.5: biases on q, k and v_proj only, none on o_proj
    mlp_bias: bool = False
    max_seq_len: int = 8192
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    pad_token_id: int | None = None
    model_type: str = "llama"  # only used to write config.json back in HF's layout
    init_std: float = 0.02

    def __post_init__(self):
        if self.layer_types is None:
            self.layer_types = ["full_attention"] * self.n_layer
        if len(self.layer_types) != self.n_layer:
            raise ValueError(f"layer_types has {len(self.layer_types)} entries for {self.n_layer} layers")
        for t in self.layer_types:
            if t not in ("full_attention", "sliding_attention"):
                raise ValueError(f"unknown layer type {t!r} (expected full_attention or sliding_attention)")
        if self.n_head % self.n_kv_head:
            raise ValueError(f"n_head {self.n_head} is not a multiple of n_kv_head {self.n_kv_head}")
        if self.mlp_act not in ("silu", "gelu_tanh"):
            raise ValueError(f"unknown mlp_act {self.mlp_act!r} (expected silu or gelu_tanh)")

    # -- presets ------------------------------------------------------------------------------------------------------

    @staticmethod
    def from_name(name: str) -> "ModelConfig":
        """Shapes of the real models (for FLOP counts and benchmarks without downloading) and tiny test presets:
        config/models.py."""
        from config.models import PRESETS  # the shapes, a file a reader opens
        if name not in PRESETS:
            raise ValueError(f"unknown model name {name!r}; known: {', '.join(sorted(PRESETS))}")
        return ModelConfig(**PRESETS[name])

    # -- Hugging Face config.json --------------------------------------------------------------------------------------

    @staticmethod
    def from_hf(hf: dict) -> "ModelConfig":
        """Read a hub `config.json` (checkpoint.config_from_hf: Gemma-2, Gemma-3 text or multimodal, Llama)."""
        return ModelConfig(**config_from_hf(hf))

    def to_hf(self) -> dict:
        """The config.json the hub would ship for this model (checkpoint.config_to_hf)."""
        return config_to_hf(self)

    # -- shapes, for the FLOPs formulas (accounting/flops.py) and parameter counts -------------------------------------

    def block_linears(self) -> dict[str, tuple[int, int]]:
        """(in_features, out_features) of each projection of a block, by its HF name (the LoRA targets)."""
        d, q, kv, ff = self.d_model, self.n_head * self.head_dim, self.n_kv_head * self.head_dim, self.d_ff
        return dict(q_proj=(d, q), k_proj=(d, kv), v_proj=(d, kv), o_proj=(q, d), gate_proj=(d, ff), up_proj=(d, ff),
                    down_proj=(ff, d))

    def n_params(self, include_embedding: bool = True) -> int:
        block = sum(i * o for i, o in self.block_linears().values())
        emb = self.vocab_size * self.d_model * (1 if self.tie_embeddings else 2)
        return self.n_layer * block + (emb if include_embedding else 0)


# ----------------------------------------------------------------------------------------------------------------------
# Building blocks


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float, offset: bool):
        super().__init__()
        self.eps, self.offset = eps, offset
        self.weight = nn.Parameter(torch.zeros(dim) if offset else torch.ones(dim))

    def forward(self, x):
        # normalise in fp32 whatever the input dtype; where the cast back happens differs between the families
        # (Gemma: (x * (1 + w)) then cast; Llama: cast then * w), and matters for bit-exact bf16
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        if self.offset:
            return (h * (1.0 + self.weight.float())).type_as(x)
        return self.weight * h.to(x.dtype)


def rope_inv_freq(cfg: ModelConfig, device=None, local: bool = False) -> torch.Tensor:
    """RoPE inverse frequencies: Llama-3.1's band-wise rescaling or Gemma-3's linear one when `rope_scaling` asks for
    it; local=True: Gemma-3's sliding layers, their own base and no scaling."""
    dim, theta = cfg.head_dim, cfg.rope_local_theta if local else cfg.rope_theta
    inv_freq = 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.int64).to(device, torch.float) / dim))
    s = None if local else cfg.rope_scaling
    if not s:
        return inv_freq
    if s.get("rope_type") == "linear":  # Gemma-3: every position divided by factor
        return inv_freq / s["factor"]
    # llama3: long wavelengths are slowed down by `factor`, short ones kept, the band between interpolated
    factor, lo, hi, old_ctx = s["factor"], s["low_freq_factor"], s["high_freq_factor"], \
        s["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > old_ctx / lo, inv_freq / factor, inv_freq)
    smooth = (old_ctx / wavelen - lo) / (hi - lo)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < old_ctx / hi) * ~(wavelen > old_ctx / lo)
    return torch.where(medium, smoothed, scaled)


def rope_cos_sin(cfg: ModelConfig, seq_len: int, device, dtype, local: bool = False):
    # computed in fp32 outside autocast: bf16 positions would collide beyond 256
    with torch.autocast(device_type=torch.device(device).type, enabled=False):
        pos = torch.arange(seq_len, device=device, dtype=torch.float)
        freqs = pos[:, None] * rope_inv_freq(cfg, device, local)[None, :]
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos().to(dtype), emb.sin().to(dtype)


def rope_tables(cfg: ModelConfig, seq_len: int, device, dtype) -> dict[bool, tuple]:
    """{local: (cos, sin)}: the global table, and Gemma-3's sliding-layer one under True (Attention.local_rope)."""
    out = {False: rope_cos_sin(cfg, seq_len, device, dtype)}
    if cfg.rope_local_theta is not None:
        out[True] = rope_cos_sin(cfg, seq_len, device, dtype, local=True)
    return out


def apply_rope(x, cos, sin):
    # HF's half-split layout: dimension i pairs with i + head_dim/2 (no weight permutation needed)
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        self.cfg = cfg
        self.n_head, self.n_kv_head, self.head_dim = cfg.n_head, cfg.n_kv_head, cfg.head_dim
        self.scale = (cfg.query_pre_attn_scalar or cfg.head_dim) ** -0.5
        sliding = cfg.layer_types[layer_idx] == "sliding_attention"
        self.window = cfg.sliding_window if sliding else None
        self.local_rope = sliding and cfg.rope_local_theta is not None  # which rope_tables entry this layer reads
        b, qkv_b = cfg.attention_bias, cfg.attention_bias or cfg.qkv_bias
        self.q_proj = nn.Linear(cfg.d_model, cfg.n_head * cfg.head_dim, bias=qkv_b)
        self.k_proj = nn.Linear(cfg.d_model, cfg.n_kv_head * cfg.head_dim, bias=qkv_b)
        self.v_proj = nn.Linear(cfg.d_model, cfg.n_kv_head * cfg.head_dim, bias=qkv_b)
        self.o_proj = nn.Linear(cfg.n_head * cfg.head_dim, cfg.d_model, bias=b)
        if cfg.qk_norm:  # Gemma-3, Qwen3: each head's query and key normalised (the model's RMSNorm) before RoPE
            self.q_norm = RMSNorm(cfg.head_dim, cfg.norm_eps, cfg.norm_offset)
            self.k_norm = RMSNorm(cfg.head_dim, cfg.norm_eps, cfg.norm_offset)

    def qkv(self, x, cos, sin):
        """Queries, keys and values (B, heads, T, head_dim), normalised (Gemma-3) and rotated; generate.py reuses it."""
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_head, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)
        if self.cfg.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        return apply_rope(q, cos, sin), apply_rope(k, cos, sin), v

    def forward(self, x, cos, sin):
        return self.o_proj(self.heads(x, cos, sin))

    def heads(self, x, cos, sin):
        """Every head's output side by side, (B, T, n_head * head_dim): o_proj's input, SAELens' attn.hook_z with its
        heads flattened (Gemma Scope's attention SAEs read it)."""
        B, T, _ = x.shape
        q, k, v = self.qkv(x, cos, sin)
        windowed = self.window is not None and T > self.window
        if self.cfg.attn_softcap is None and not windowed:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=self.scale,
                                               enable_gqa=self.n_kv_head != self.n_head)
        else:
            y = self._capped_attention(q, k, v, T)
        return y.transpose(1, 2).reshape(B, T, self.n_head * self.head_dim)

    def _capped_attention(self, q, k, v, T):
        # Gemma-2: logits soft-capped before masking; sliding layers see only the last `window` positions.
        # Under torch.compile this becomes one fused flex_attention kernel that also skips blocks outside the
        # window (faster than the math below, on CPU too); flex has no CPU backward, so CPU training
        # keeps the math path.
        # On CPU, torch 2.13's compiled flex kernel gives wrong outputs for some lengths that are not a multiple of
        # its 128-token block with a sliding window (T = 40, 56, 120 found wrong, 64, 256 right): use it only on whole
        # blocks there.
        if torch.compiler.is_compiling() and (flex_fits(q.device, self.head_dim, torch.is_grad_enabled()) if q.is_cuda
                                              else not torch.is_grad_enabled() and T % 128 == 0):
            return self._flex_attention(q, k, v, T)
        rep = self.n_head // self.n_kv_head
        k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        scores = (q @ k.transpose(-2, -1)) * self.scale
        if self.cfg.attn_softcap is not None:
            cap = self.cfg.attn_softcap
            scores = torch.tanh(scores / cap) * cap
        i = torch.arange(T, device=q.device)
        mask = i[None, :] <= i[:, None]
        if self.window is not None:
            mask = mask & (i[None, :] > i[:, None] - self.window)
        scores = scores.masked_fill(~mask, float("-inf"))
        return F.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype) @ v

    def _flex_attention(self, q, k, v, T):
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention
        cap, window = self.cfg.attn_softcap, self.window

        def score_mod(score, b, h, qi, ki):
            return score if cap is None else torch.tanh(score / cap) * cap

        def mask_mod(b, h, qi, ki):
            return (ki <= qi) & (ki > qi - window) if window is not None else ki <= qi

        block_mask = create_block_mask(mask_mod, None, None, T, T, device=q.device)
        return flex_attention(q, k, v, score_mod=score_mod, block_mask=block_mask, scale=self.scale,
                              enable_gqa=self.n_kv_head != self.n_head)


FLEX_BACKWARD_SMEM = 160 * 1024  # bytes of shared memory per block flex_attention's backward needs at head_dim 256


def flex_fits(device: torch.device, head_dim: int, grad: bool, smem: int | None = None) -> bool:
    """Whether the fused flex_attention kernel compiles here. Its backward at Gemma-2's head_dim 256 needs more shared
    memory per block than GPUs with ~100 KB (RTX 30/40-series, sm_12x) have (pytorch/pytorch issues 133254, 198224):
    there the math path runs instead, with one warning. H100 / A100 (227 / 163 KB) keep the fused kernel."""
    if not grad or head_dim <= 128:
        return True
    if smem is None:
        smem = torch.cuda.get_device_properties(device).shared_memory_per_block_optin
    if smem >= FLEX_BACKWARD_SMEM:
        return True
    _warn_unfused(head_dim, smem)
    return False


@torch.compiler.disable  # called while tracing: a warning is a side effect dynamo would not replay
def _warn_unfused(head_dim: int, smem: int):
    warnings.warn(f"flex_attention's backward at head_dim {head_dim} does not fit this GPU's {smem // 1024} KB of shared "
                  f"memory per block: Gemma-2's attention runs unfused (slower, same result)", stacklevel=3)


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        b = cfg.mlp_bias
        self.gate_proj = nn.Linear(cfg.d_model, cfg.d_ff, bias=b)
        self.up_proj = nn.Linear(cfg.d_model, cfg.d_ff, bias=b)
        self.down_proj = nn.Linear(cfg.d_ff, cfg.d_model, bias=b)
        self.gelu = cfg.mlp_act == "gelu_tanh"

    def forward(self, x):
        g = self.gate_proj(x)
        g = F.gelu(g, approximate="tanh") if self.gelu else F.silu(g)
        return self.down_proj(g * self.up_proj(x))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        norm = lambda: RMSNorm(cfg.d_model, cfg.norm_eps, cfg.norm_offset)  # noqa: E731
        self.sandwich = cfg.sandwich_norms
        self.self_attn = Attention(cfg, layer_idx)
        self.mlp = MLP(cfg)
        self.input_layernorm = norm()
        self.post_attention_layernorm = norm()  # Llama uses this name for its pre-MLP norm
        if self.sandwich:
            self.pre_feedforward_layernorm = norm()
            self.post_feedforward_layernorm = norm()

    def mlp_out(self, h):
        """The MLP sublayer's contribution to the residual stream from its normalised input h: what a transcoder
        replaces (Gemma Scope 2's hf_hook_point_in / _out: pre_ and post_feedforward_layernorm's outputs)."""
        y = self.mlp(h)
        return self.post_feedforward_layernorm(y) if self.sandwich else y

    def forward(self, x, cos, sin, hooks=None, attn_heads=None):
        """hooks {site: fn} replace activations inside the block (splice.py): "attn_z" o_proj's input (SAELens'
        attn.hook_z, heads flattened); "attn_out" / "mlp_out" the sublayer's contribution to the stream (Gemma: after
        its post-norm, as TransformerLens' hook_attn_out / hook_mlp_out; Llama: o_proj's / down_proj's output); "mlp"
        fn(h, mlp_out) in place of mlp_out(h) (a transcoder). attn_heads(h): the heads' output in place of
        self_attn.heads (evals/generate.py's cached attention)."""
        hooks = hooks or {}
        h = self.input_layernorm(x)
        z = attn_heads(h) if attn_heads is not None else self.self_attn.heads(h, cos, sin)
        if "attn_z" in hooks:
            z = hooks["attn_z"](z)
        a = self.self_attn.o_proj(z)
        if self.sandwich:  # Gemma-2 and -3: normalise both the input and the output of each sublayer
            a = self.post_attention_layernorm(a)
        if "attn_out" in hooks:
            a = hooks["attn_out"](a)
        x = x + a
        h = self.pre_feedforward_layernorm(x) if self.sandwich else self.post_attention_layernorm(x)
        m = self.mlp_out(h) if "mlp" not in hooks else hooks["mlp"](h, self.mlp_out)
        if "mlp_out" in hooks:
            m = hooks["mlp_out"](m)
        return x + m


SITES = ("attn_z", "attn_out", "mlp", "mlp_out")  # Block.forward's hook sites; model(hooks={(site, L): fn})


class Backbone(nn.Module):
    """Holds what HF keeps under the `model.` prefix."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.layers = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layer))
        self.norm = RMSNorm(cfg.d_model, cfg.norm_eps, cfg.norm_offset)


# ----------------------------------------------------------------------------------------------------------------------
# The model


Hook = Callable[[torch.Tensor], torch.Tensor]


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.model = Backbone(cfg)
        if not cfg.tie_embeddings:  # tied models read the embedding matrix directly (no lm_head parameter)
            self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        self.run_block = run_block  # compile_blocks swaps in the compiled one

    # -- the forward pass, in three pieces that training scripts also use on their own --------------------------------

    def embed(self, idx: torch.Tensor) -> torch.Tensor:
        if not torch.compiler.is_compiling():
            _check_tokens(idx, self.cfg.vocab_size)
        x = self.model.embed_tokens(idx)
        if self.cfg.embed_scale:  # Gemma: the scale is rounded to the activation dtype, as in the reference
            x = x * torch.tensor(self.cfg.d_model ** 0.5, dtype=x.dtype)
        return x

    def blocks(self, x: torch.Tensor, start: int = 0, stop: int | None = None,
               hooks: dict[int, Hook] | None = None) -> torch.Tensor:
        """Run blocks start..stop (inclusive) on the residual stream x; hooks[L] replaces the stream after block L,
        hooks[site, L] an activation inside block L (Block.forward's sites: attention heads or output, a transcoder's
        MLP, the MLP's output)."""
        stop = self.cfg.n_layer - 1 if stop is None else stop
        hooks = hooks or {}
        inside = block_hooks(hooks)
        rope = rope_tables(self.cfg, x.shape[1], x.device, x.dtype)
        for i in range(start, stop + 1):
            layer = self.model.layers[i]
            x = self.run_block(layer, x, *rope[layer.self_attn.local_rope], inside.get(i))
            if i in hooks:
                x = hooks[i](x)
        return x

    def head(self, x: torch.Tensor) -> torch.Tensor:
        """Final norm, unembedding and Gemma-2's logit soft-cap (Gemma-3 has none): residual stream -> logits."""
        x = self.model.norm(x)
        w = self.model.embed_tokens.weight if self.cfg.tie_embeddings else self.lm_head.weight
        logits = F.linear(x, w)
        if self.cfg.final_softcap is not None:
            cap = self.cfg.final_softcap
            logits = torch.tanh(logits / cap) * cap
        return logits

    def forward(self, idx: torch.Tensor, hooks: dict[int, Hook] | None = None,
                stop_at: int | None = None) -> torch.Tensor:
        if not torch.compiler.is_compiling():
            self._check_layers(hooks, stop_at)
        x = self.blocks(self.embed(idx), 0, stop_at, hooks)
        return x if stop_at is not None else self.head(x)

    def _check_layers(self, hooks, stop_at):
        n = self.cfg.n_layer
        keys = [k[1] if isinstance(k, tuple) and len(k) == 2 and k[0] in SITES else k for k in hooks or {}]
        for layer in keys + ([stop_at] if stop_at is not None else []):
            if not isinstance(layer, int) or not 0 <= layer < n:
                raise ValueError(f"layer {layer!r} is out of range: this model has layers 0..{n - 1}")

    # -- initialisation -----------------------------------------------------------------------------------------------

    @torch.no_grad()
    def init_weights(self, seed: int | None = None):
        device = next(self.parameters()).device  # a generator where the weights are: init on a GPU stays there
        gen = torch.Generator(device=device).manual_seed(seed) if seed is not None else None
        for name, p in self.named_parameters():
            if name.endswith("norm.weight"):
                nn.init.zeros_(p) if self.cfg.norm_offset else nn.init.ones_(p)
            elif name.endswith(".bias"):
                nn.init.zeros_(p)
            else:
                nn.init.normal_(p, 0.0, self.cfg.init_std, generator=gen)
        return self

    # -- loading ------------------------------------------------------------------------------------------------------------

    @staticmethod
    def from_pretrained(path_or_repo_id: str, dtype: torch.dtype | None = None, device=None) -> "Transformer":
        """Load a local HF folder or hub id (config.json + single or sharded safetensors). dtype None keeps the file's.
        Tensors are read, cast and placed one at a time: the peak is the loaded model plus its largest tensor."""
        folder = resolve_model_dir(path_or_repo_id)
        cfg = ModelConfig.from_hf(read_config(folder))
        with torch.device("meta"):
            model = Transformer(cfg)
        load_checkpoint(model, folder, dtype=dtype, device=device)
        return model.eval()

    def save_pretrained(self, folder: str):
        """Write config.json + model.safetensors in HF layout, atomically (temp names, then rename)."""
        save_checkpoint(self.state_dict(), folder, self.cfg.to_hf())


def run_block(layer: Block, x, cos, sin, hooks=None):
    """One block on the stream: the region compile_blocks compiles."""
    return layer(x, cos, sin, hooks)


def compile_blocks(model: Transformer, enable: bool = True, backend: str = "inductor") -> Transformer:
    """Regional compilation: the block compiled as its own graph, not the model. Dynamo lifts a module's parameters
    to graph inputs, so every block of the same kind reuses one graph and cold compile time stays nearly flat in
    depth. A kind is what the guards tell apart: sliding or global attention, adapters on, off or absent, grad mode,
    train or eval, a splice inside the block; a handful per script."""
    if enable:
        import torch._dynamo
        # every kind, in both passes and the evaluation, under one code object: more than dynamo's default of 8
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
    model.run_block = torch.compile(run_block, backend=backend) if enable else run_block
    return model


def block_hooks(hooks: dict) -> dict[int, dict]:
    """{(site, L): fn} entries of a hooks dict as {L: {site: fn}}, what Block.forward takes."""
    out: dict[int, dict] = {}
    for key, fn in hooks.items():
        if isinstance(key, tuple):
            out.setdefault(key[1], {})[key[0]] = fn
    return out


def _check_tokens(idx: torch.Tensor, vocab_size: int):
    if idx.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"token ids must be int64 (or int32), got {idx.dtype}")
    if idx.dim() != 2:
        raise ValueError(f"token ids must have shape (batch, seq_len), got {tuple(idx.shape)}")
    if idx.numel():
        lo, hi = int(idx.min()), int(idx.max())
        if lo < 0 or hi >= vocab_size:
            bad = hi if hi >= vocab_size else lo
            raise ValueError(f"token id {bad} is outside the vocabulary (size {vocab_size}): wrong tokenizer?")
