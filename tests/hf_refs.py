"""Tiny random Hugging Face reference checkpoints, written by `transformers` itself (test-only dependency)."""
import json
import os

import torch

TINY_GEMMA2 = dict(model_type="gemma2", architectures=["Gemma2ForCausalLM"], vocab_size=512, hidden_size=64,
                   intermediate_size=128, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                   head_dim=16, hidden_activation="gelu_pytorch_tanh", hidden_act="gelu_pytorch_tanh",
                   max_position_embeddings=256, rms_norm_eps=1e-6, rope_theta=10000.0, attention_bias=False,
                   attention_dropout=0.0, query_pre_attn_scalar=24, sliding_window=8, final_logit_softcapping=3.0,
                   attn_logit_softcapping=2.0, tie_word_embeddings=True, bos_token_id=2, eos_token_id=1,
                   pad_token_id=0, initializer_range=0.3, torch_dtype="float32")

# Gemma-3 as the hub ships gemma-3-1b's config.json (old RoPE keys, sliding_window_pattern): 6 layers, global every
# 3rd, a window of 8, the two RoPE bases and the 4B+ models' linear scaling on the global layers
TINY_GEMMA3 = dict(model_type="gemma3_text", architectures=["Gemma3ForCausalLM"], vocab_size=512, hidden_size=64,
                   intermediate_size=128, num_hidden_layers=6, num_attention_heads=4, num_key_value_heads=2,
                   head_dim=16, hidden_activation="gelu_pytorch_tanh", max_position_embeddings=256,
                   rms_norm_eps=1e-6, rope_theta=1_000_000.0, rope_local_base_freq=10_000.0,
                   rope_scaling={"rope_type": "linear", "factor": 8.0}, attention_bias=False, attention_dropout=0.0,
                   query_pre_attn_scalar=24, sliding_window=8, sliding_window_pattern=3, final_logit_softcapping=None,
                   attn_logit_softcapping=None, tie_word_embeddings=True, bos_token_id=2, eos_token_id=1,
                   pad_token_id=0, initializer_range=0.3, torch_dtype="float32")

TINY_LLAMA3 = dict(model_type="llama", architectures=["LlamaForCausalLM"], vocab_size=512, hidden_size=64,
                   intermediate_size=128, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                   hidden_act="silu", max_position_embeddings=256, rms_norm_eps=1e-5, rope_theta=500000.0,
                   rope_scaling={"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
                                 "high_freq_factor": 4.0, "original_max_position_embeddings": 64},
                   attention_bias=False, mlp_bias=False, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2,
                   initializer_range=0.1, torch_dtype="float32")


def hf_config(hub: dict):
    from transformers import AutoConfig
    kw = {k: v for k, v in hub.items() if k not in ("model_type", "architectures", "torch_dtype")}
    return AutoConfig.for_model(hub["model_type"], **kw)


def make_hf_checkpoint(folder, hub: dict, seed=0, shard=False, hub_style_config=True):
    """Random HF model with randomised norm weights saved to `folder`; returns the HF model (eager attention, fp32).

    hub_style_config rewrites config.json by hand exactly as the hub ships it (old `rope_theta` / `rope_scaling`
    keys), instead of the `rope_parameters` form that recent transformers writes.
    """
    from transformers import AutoModelForCausalLM
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(hf_config(hub), attn_implementation="eager", dtype=torch.float32)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:  # default init is all-zero/one: randomise so the (1 + w) convention is tested
                p.copy_(torch.randn_like(p) * 0.5 + (0.0 if hub["model_type"].startswith("gemma") else 1.0))
    model.save_pretrained(folder, max_shard_size="100KB" if shard else "2GB")
    if hub_style_config:
        with open(os.path.join(folder, "config.json"), "w") as f:
            json.dump(hub, f, indent=2)
    # reload through the written files so the reference reads exactly what ours reads
    ref = AutoModelForCausalLM.from_pretrained(folder, attn_implementation="eager", dtype=torch.float32)
    return ref.eval()


def rel_err(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()
