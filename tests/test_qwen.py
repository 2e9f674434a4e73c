"""model.py's Qwen2 / Qwen2.5 and Qwen3 (dense) against transformers' Qwen2ForCausalLM / Qwen3ForCausalLM on tiny
random checkpoints: logits and every hidden state, GQA, tied and untied embeddings, the sliding-window settings."""
import json
import os

import pytest
import torch

from model import ModelConfig, Transformer
from fixtures.hf_refs import make_hf_checkpoint, rel_err
from tests.test_model import assert_matches_hf

# as the hub ships Qwen2.5-0.5B's / Qwen3-0.6B's config.json, at tiny sizes
TINY_QWEN2 = dict(model_type="qwen2", architectures=["Qwen2ForCausalLM"], vocab_size=512, hidden_size=64,
                  intermediate_size=128, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                  hidden_act="silu", max_position_embeddings=256, rms_norm_eps=1e-6, rope_theta=1_000_000.0,
                  rope_scaling=None, use_sliding_window=False, sliding_window=8, max_window_layers=2,
                  tie_word_embeddings=True, bos_token_id=1, eos_token_id=2, initializer_range=0.2,
                  attention_dropout=0.0, torch_dtype="float32")
TINY_QWEN3 = dict(model_type="qwen3", architectures=["Qwen3ForCausalLM"], vocab_size=512, hidden_size=64,
                  intermediate_size=128, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                  head_dim=32, hidden_act="silu", max_position_embeddings=256, rms_norm_eps=1e-6,
                  rope_theta=1_000_000.0, rope_scaling=None, attention_bias=False, use_sliding_window=False,
                  sliding_window=None, max_window_layers=4, tie_word_embeddings=False, bos_token_id=1,
                  eos_token_id=2, initializer_range=0.2, attention_dropout=0.0, torch_dtype="float32")
WINDOWED = {"use_sliding_window": True, "sliding_window": 8}  # layers max_window_layers.. slide (Qwen2Config)
T = 24  # longer than the window


def tokens(B=2, seed=0):
    return torch.randint(0, 512, (B, T), generator=torch.Generator().manual_seed(seed))


def randomise_biases(ref, folder):
    # transformers initialises biases to zero: random ones, saved again, so that they are tested
    with torch.no_grad():
        for name, p in ref.named_parameters():
            if name.endswith(".bias"):
                p.copy_(torch.randn_like(p))
    ref.save_pretrained(folder)


@pytest.mark.parametrize("hub", [
    TINY_QWEN2, {**TINY_QWEN2, **WINDOWED}, {**TINY_QWEN2, "tie_word_embeddings": False, "num_key_value_heads": 1},
    TINY_QWEN3, {**TINY_QWEN3, "tie_word_embeddings": True}, {**TINY_QWEN3, **WINDOWED, "max_window_layers": 1},
    {**TINY_QWEN3, "attention_bias": True, "num_key_value_heads": 4},
], ids=["qwen2", "qwen2-window", "qwen2-untied-mqa", "qwen3", "qwen3-tied", "qwen3-window", "qwen3-bias-mha"])
def test_logits_and_hidden_states_match_transformers(tmp_path, hub):
    ref = make_hf_checkpoint(tmp_path, hub)
    randomise_biases(ref, tmp_path)
    (tmp_path / "config.json").write_text(json.dumps(hub))  # the hub's own keys, not what transformers writes
    ours = Transformer.from_pretrained(str(tmp_path))
    assert ours.cfg.qkv_bias == (hub["model_type"] == "qwen2") and ours.cfg.qk_norm == (hub["model_type"] == "qwen3")
    assert_matches_hf(ours, ref, tokens())


def test_biases_norms_and_window_actually_bite(tmp_path):
    # the parity test would be vacuous if Qwen2's biases, Qwen3's q/k norms or the window changed nothing
    ref = make_hf_checkpoint(tmp_path / "q2", {**TINY_QWEN2, **WINDOWED})
    randomise_biases(ref, tmp_path / "q2")
    q2 = Transformer.from_pretrained(str(tmp_path / "q2"))
    assert [a.self_attn.window for a in q2.model.layers] == [None, None, 8, 8]
    assert q2.model.layers[0].self_attn.o_proj.bias is None and q2.model.layers[0].self_attn.q_proj.bias is not None
    idx = tokens()
    with torch.no_grad():
        base = q2(idx)
        for layer in q2.model.layers:
            layer.self_attn.window = None
        assert rel_err(q2(idx), base) > 1e-3
        for layer in q2.model.layers:
            layer.self_attn.k_proj.bias.zero_()  # a key bias shifts every score of a query alike: softmax ignores it
            layer.self_attn.q_proj.bias.zero_()
        assert rel_err(q2(idx), base) > 1e-3
    make_hf_checkpoint(tmp_path / "q3", TINY_QWEN3)
    q3 = Transformer.from_pretrained(str(tmp_path / "q3"))
    with torch.no_grad():
        base = q3(idx)
        q3.cfg.qk_norm = False
        assert rel_err(q3(idx), base) > 1e-3


@pytest.mark.parametrize("name", ["tiny-qwen2", "tiny-qwen3"])
def test_save_pretrained_loads_in_transformers(tmp_path, name):
    from transformers import AutoModelForCausalLM
    model = Transformer(ModelConfig.from_name(name)).init_weights(0)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)  # non-zero biases, norms away from 1
    model.save_pretrained(str(tmp_path))
    ref = AutoModelForCausalLM.from_pretrained(str(tmp_path), attn_implementation="eager").eval()
    assert type(ref).__name__ == {"tiny-qwen2": "Qwen2ForCausalLM", "tiny-qwen3": "Qwen3ForCausalLM"}[name]
    idx = tokens()
    with torch.no_grad():
        assert rel_err(model(idx), ref(idx).logits) < 1e-4
        assert torch.equal(Transformer.from_pretrained(str(tmp_path))(idx), model(idx))


def test_presets_have_the_published_sizes():
    # the model cards' counts: Qwen2.5-0.5B 0.49B (0.36B without embeddings), Qwen3-0.6B 0.6B (0.44B), Qwen3-8B 8.2B
    # (6.95B); ours leave out norms and biases
    assert abs(ModelConfig.from_name("qwen2.5-0.5b").n_params() / 1e9 - 0.49) < 0.01
    assert abs(ModelConfig.from_name("qwen2.5-0.5b").n_params(False) / 1e9 - 0.36) < 0.01
    assert abs(ModelConfig.from_name("qwen3-0.6b").n_params(False) / 1e9 - 0.44) < 0.01
    assert abs(ModelConfig.from_name("qwen3-8b").n_params(False) / 1e9 - 6.95) < 0.01


@pytest.mark.parametrize("model_type", ["qwen2_moe", "qwen3_moe"])
def test_mixture_of_experts_refused_in_one_line(tmp_path, model_type):
    (tmp_path / "config.json").write_text(json.dumps({**TINY_QWEN3, "model_type": model_type}))
    with pytest.raises(ValueError, match=f"'{model_type}' is a mixture-of-experts model") as e:
        Transformer.from_pretrained(str(tmp_path))
    assert "\n" not in str(e.value)


# -- the tokenizer: Qwen ships only a tokenizer.json ---------------------------------------------------------------------


def qwen_tokenizer_folder(folder, vocab_size=600):
    """A small byte-level BPE trained here, written by transformers' Qwen2Tokenizer (NFC, Qwen2's split pattern, its
    special tokens) with a config.json naming <|endoftext|> as BOS and EOS, as the Qwen repos do."""
    from tokenizers import ByteLevelBPETokenizer
    from transformers import Qwen2Tokenizer
    import inspect
    import textwrap
    text = textwrap.dedent(inspect.getsource(json)) + " Ünïcödé café naïve 12345 \r\n\t  tabs  "
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator([text] * 3, vocab_size=vocab_size, special_tokens=["<|endoftext|>"], show_progress=False)
    model = json.loads(bpe.to_str())["model"]
    tok = Qwen2Tokenizer(vocab=model["vocab"], merges=[tuple(m) if isinstance(m, list) else tuple(m.split(" "))
                                                       for m in model["merges"]])
    tok.add_tokens(["<|im_start|>", "<|im_end|>"], special_tokens=True)
    tok.add_tokens(["<think>"])
    tok.save_pretrained(str(folder))
    eot = tok.convert_tokens_to_ids("<|endoftext|>")
    (folder / "config.json").write_text(json.dumps({**TINY_QWEN3, "bos_token_id": eot, "eos_token_id": eot}))
    return tok, text


def test_tokenizer_json_encodes_as_transformers(tmp_path):
    from formats.tokenizer import load_tokenizer
    ref, text = qwen_tokenizer_folder(tmp_path)
    assert "tokenizer.json" in os.listdir(tmp_path) and "tokenizer.model" not in os.listdir(tmp_path)
    ours = load_tokenizer(str(tmp_path))
    eot = ref.convert_tokens_to_ids("<|endoftext|>")
    assert (ours.bos_id, ours.eos_id) == (eot, eot)
    decomposed = "cafe\u0301 e\u0301te\u0301"  # NFC composes these: the normaliser must run first
    for t in (text, decomposed, "def f(x):\n    return x  # 2024 ünïcödé\n\n\n", "<think> plain text"[8:]):
        assert ours.encode(t) == ref.encode(t, add_special_tokens=False), t[:40]
    assert ours.decode(ours.encode(text)) == text
    assert ours.encode(decomposed) != ref.encode(decomposed.replace("\u0301", ""), add_special_tokens=False)
    (tmp_path / "tokenizer.json").write_text(json.dumps({"model": {"type": "Unigram"}}))
    with pytest.raises(ValueError, match="only byte-level BPE tokenizers are supported"):
        load_tokenizer(str(tmp_path))


@pytest.mark.parametrize("name", ["tiny-qwen2", "tiny-qwen3"])
def test_compile_has_no_graph_breaks(name):
    import torch._dynamo
    model = Transformer(ModelConfig.from_name(name)).init_weights(0)
    explanation = torch._dynamo.explain(model)(tokens(), hooks={1: lambda x: x * 2.0})
    assert explanation.graph_break_count == 0, explanation.break_reasons
