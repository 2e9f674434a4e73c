"""The shapes of the real models by name (`ModelConfig.from_name`: FLOP counts and benchmarks without a download) and
the tiny presets the tests build, as ModelConfig's fields. Each family's fields as its hub config.json states them."""
from __future__ import annotations


def _gemma2(n_layer, d_model, d_ff, n_head, n_kv_head, head_dim=256, query_pre_attn_scalar=256, vocab=256000):
    return dict(vocab_size=vocab, d_model=d_model, d_ff=d_ff, n_layer=n_layer, n_head=n_head, n_kv_head=n_kv_head,
                head_dim=head_dim, norm_offset=True, sandwich_norms=True, embed_scale=True, mlp_act="gelu_tanh",
                query_pre_attn_scalar=query_pre_attn_scalar, attn_softcap=50.0, final_softcap=30.0,
                sliding_window=4096, layer_types=["sliding_attention" if (i + 1) % 2 else "full_attention"
                                                  for i in range(n_layer)],
                tie_embeddings=True, bos_token_id=2, eos_token_id=1, pad_token_id=0, model_type="gemma2")


def _gemma3(n_layer, d_model, d_ff, n_head, n_kv_head, head_dim=256, query_pre_attn_scalar=256, vocab=262144,
            window=512, pattern=6):
    # Gemma-3 on Gemma-2's layout, less the soft-caps, plus QK-norm and a second RoPE base for its sliding layers
    return {**_gemma2(n_layer, d_model, d_ff, n_head, n_kv_head, head_dim, query_pre_attn_scalar, vocab),
            "attn_softcap": None, "final_softcap": None, "qk_norm": True, "rope_theta": 1_000_000.0,
            "rope_local_theta": 10_000.0, "sliding_window": window, "max_seq_len": 32768, "model_type": "gemma3_text",
            "layer_types": ["sliding_attention" if (i + 1) % pattern else "full_attention" for i in range(n_layer)]}


_LLAMA31_ROPE = {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                 "original_max_position_embeddings": 8192}


def _llama3(n_layer, d_model, d_ff, n_head, n_kv_head, tie, factor=32.0):
    return dict(vocab_size=128256, d_model=d_model, d_ff=d_ff, n_layer=n_layer, n_head=n_head, n_kv_head=n_kv_head,
                head_dim=d_model // n_head, norm_eps=1e-5, rope_theta=500000.0,
                rope_scaling={**_LLAMA31_ROPE, "factor": factor}, tie_embeddings=tie, max_seq_len=131072,
                bos_token_id=128000, eos_token_id=128001, model_type="llama")


def _qwen(n_layer, d_model, d_ff, n_head, n_kv_head, head_dim, tie, qwen3):
    # Llama's block with Qwen2's q/k/v biases, or Qwen3's per-head q/k RMSNorm and no biases
    return dict(vocab_size=151936, d_model=d_model, d_ff=d_ff, n_layer=n_layer, n_head=n_head, n_kv_head=n_kv_head,
                head_dim=head_dim, norm_eps=1e-6, rope_theta=1_000_000.0, tie_embeddings=tie, qkv_bias=not qwen3,
                qk_norm=qwen3, max_seq_len=40960 if qwen3 else 32768, bos_token_id=151643,
                eos_token_id=151645 if qwen3 else 151643,
                model_type="qwen3" if qwen3 else "qwen2")


PRESETS = {
    "gemma-2-2b": _gemma2(26, 2304, 9216, 8, 4),
    "gemma-2-9b": _gemma2(42, 3584, 14336, 16, 8),
    "gemma-2-27b": _gemma2(46, 4608, 36864, 32, 16, head_dim=128, query_pre_attn_scalar=144),
    "gemma-3-1b": _gemma3(26, 1152, 6912, 4, 1),
    "llama-3.2-1b": _llama3(16, 2048, 8192, 32, 8, tie=True),
    "llama-3.2-3b": _llama3(28, 3072, 8192, 24, 8, tie=True),
    "llama-3.1-8b": _llama3(32, 4096, 14336, 32, 8, tie=False, factor=8.0),
    "qwen2.5-0.5b": _qwen(24, 896, 4864, 14, 2, 64, tie=True, qwen3=False),
    "qwen2.5-1.5b": _qwen(28, 1536, 8960, 12, 2, 128, tie=True, qwen3=False),
    "qwen3-0.6b": _qwen(28, 1024, 3072, 16, 8, 128, tie=True, qwen3=True),
    "qwen3-1.7b": _qwen(28, 2048, 6144, 16, 8, 128, tie=True, qwen3=True),
    "qwen3-8b": _qwen(36, 4096, 12288, 32, 8, 128, tie=False, qwen3=True),
    # tiny presets for tests: every feature switched on, shapes small enough for a laptop CPU
    "tiny-gemma2": {**_gemma2(4, 64, 128, 4, 2, head_dim=16, query_pre_attn_scalar=24, vocab=512),
                    "sliding_window": 8, "max_seq_len": 256},
    "tiny-gemma3": {**_gemma3(6, 64, 128, 4, 2, head_dim=16, query_pre_attn_scalar=24, vocab=512, window=8,
                              pattern=3), "max_seq_len": 256,
                    "rope_scaling": {"rope_type": "linear", "factor": 8.0}},
    "tiny-llama3": {**_llama3(4, 64, 128, 4, 2, tie=False), "vocab_size": 512, "max_seq_len": 256,
                    "rope_scaling": {**_LLAMA31_ROPE, "original_max_position_embeddings": 64},
                    "bos_token_id": 1, "eos_token_id": 2},
    "tiny-qwen2": {**_qwen(4, 64, 128, 4, 2, 16, tie=True, qwen3=False), "vocab_size": 512, "max_seq_len": 256,
                   "sliding_window": 8, "layer_types": ["full_attention"] * 2 + ["sliding_attention"] * 2,
                   "bos_token_id": 1, "eos_token_id": 2},
    "tiny-qwen3": {**_qwen(4, 64, 128, 4, 2, 16, tie=False, qwen3=True), "vocab_size": 512, "max_seq_len": 256,
                   "bos_token_id": 1, "eos_token_id": 2},
}
