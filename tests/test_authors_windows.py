"""data.py's "authors" layout: the windows chunk_and_tokenize makes (the authors' eleuther_sae data.py), token by token,
the documents round-tripped, the loader on them (fixtures: tests/test_data.py)."""
import base64
import json
import os

import numpy as np
import pytest
import torch

import data
from formats.gguf import LLAMA3_PATTERN
from formats.corpus import iter_documents
from tests.need import need
from data import TokenLoader, load_tokens, prepare
from formats.tokenizer import LLAMA3_SPECIALS, load_tokenizer

from tests.test_data import arange_dataset, mini_bpe_ranks, sp_model, stdlib_text, write_corpus  # noqa: F401


# ----------------------------------------------------------------------------------------------------------------------
# The authors' window layout (chunk_and_tokenize)


def llama3_pair(folder):
    """Our tiktoken Tokenizer and the same vocabulary as a Hugging Face fast tokenizer with Llama-3's post-processor
    (BOS before every sequence, nothing after): the reference for chunk_and_tokenize's windows."""
    need("transformers")
    from tokenizers import processors
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import TikTokenConverter
    ranks = mini_bpe_ranks(" ".join(stdlib_text("bisect.py", "fnmatch.py")), n_merges=80)
    os.makedirs(os.path.join(folder, "original"), exist_ok=True)
    path = os.path.join(folder, "original", "tokenizer.model")
    with open(path, "wb") as f:
        for tok, rank in sorted(ranks.items(), key=lambda kv: kv[1]):
            f.write(base64.b64encode(tok) + b" %d\n" % rank)
    ours = load_tokenizer(str(folder))
    hf = TikTokenConverter(vocab_file=path, pattern=LLAMA3_PATTERN,
                           extra_special_tokens=LLAMA3_SPECIALS).converted()
    bos, eos = "<|begin_of_text|>", "<|end_of_text|>"
    hf.post_processor = processors.TemplateProcessing(single=f"{bos} $A", special_tokens=[(bos, ours.bos_id)])
    hf = PreTrainedTokenizerFast(tokenizer_object=hf, bos_token=bos, eos_token=eos)
    assert (hf.bos_token_id, hf.eos_token_id) == (ours.bos_id, ours.eos_id)
    return ours, hf


def chunk_and_tokenize_batch(hf, texts, max_seq_len):
    """The authors' _tokenize_fn (eleuther_sae/sae/data.py) on one map batch, with a fast tokenizer."""
    chunk_size = min(hf.model_max_length, max_seq_len)
    out = hf(hf.eos_token.join([""] + texts), max_length=chunk_size, return_attention_mask=False,
             return_overflowing_tokens=True, truncation=True)
    assert "overflowing_tokens" not in out  # a fast tokenizer returns the chunks as rows already
    return out["input_ids"][:-1]


def test_authors_layout_matches_chunk_and_tokenize_token_by_token(tmp_path):
    ours, hf = llama3_pair(tmp_path / "tok")
    docs = [t[i:i + n] for t in stdlib_text("bisect.py", "fnmatch.py", "colorsys.py")
            for i, n in zip(range(0, 4000, 400), (3, 50, 400, 1, 200, 90, 399, 7, 120, 260))]
    docs = [d for d in docs if d]
    assert [hf(d, add_special_tokens=False)["input_ids"] for d in docs] == ours.encode_batch(docs)
    for seq_len in (2, 17, 64):
        got = data.authors_windows(ours.encode_batch(docs), ours.bos_id, ours.eos_id, seq_len)
        assert got.tolist() == chunk_and_tokenize_batch(hf, docs, seq_len)
    # prepare: groups of documents in the source's order, val = the first windows, train = the next ones
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    with open(corpus / "docs.jsonl", "w") as f:
        f.writelines(json.dumps({"text": d}) + "\n" for d in docs)
    meta = prepare(str(corpus), str(tmp_path / "ds"), ours, val_tokens=100, seed=5, verbose=False, layout="authors",
                   seq_len=16, group_docs=7)
    order = list(iter_documents(str(corpus), 5))
    ref = [row for i in range(0, len(order), 7) for row in chunk_and_tokenize_batch(hf, order[i:i + 7], 16)]
    n_val = -(-100 // 16)
    assert (meta["layout"], meta["seq_len"], meta["val_tokens"]) == ("authors", 16, n_val * 16)
    val, train = (load_tokens(str(tmp_path / "ds"), s).reshape(-1, 16).tolist() for s in ("val", "train"))
    assert val == ref[:n_val] and train == ref[n_val:]
    capped = prepare(str(corpus), str(tmp_path / "ds2"), ours, max_tokens=40, val_tokens=100, seed=5,
                     verbose=False, layout="authors", seq_len=16, group_docs=7)
    assert capped["train_tokens"] == 3 * 16  # ceil(40 / 16) windows, as utils.py's train_cutoff
    assert load_tokens(str(tmp_path / "ds2"), "train").reshape(-1, 16).tolist() == ref[n_val:n_val + 3]


def test_authors_layout_round_trips_the_documents(sp_model, tmp_path):
    docs = write_corpus(tmp_path / "corpus", n_jsonl=30)
    tok = load_tokenizer(str(sp_model / "gemma"))
    meta = prepare(str(tmp_path / "corpus"), str(tmp_path / "ds"), tok, val_tokens=64, verbose=False,
                   layout="authors", seq_len=32, group_docs=10 ** 6)
    rows = np.concatenate([load_tokens(str(tmp_path / "ds"), s).reshape(-1, 32) for s in ("val", "train")])
    assert (rows[:, 0] == tok.bos_id).all() and not (rows[:, 1:] == tok.bos_id).any()
    stream = rows[:, 1:].reshape(-1).tolist()  # minus the BOS each window gets: EOS d1 EOS d2 ... cut short
    assert stream[0] == tok.eos_id
    cuts = [i for i, t in enumerate(stream) if t == tok.eos_id] + [len(stream)]
    decoded = [tok.decode(stream[a + 1:b]) for a, b in zip(cuts, cuts[1:])]
    order = list(iter_documents(str(tmp_path / "corpus"), 0))
    assert sorted(order) == sorted(docs)
    assert decoded[:-1] == order[:len(decoded) - 1]  # whole documents in order; the last one is cut by the window
    assert meta["val_docs"] + meta["train_docs"] == len(decoded)
    assert len(stream) > sum(len(tok.encode(d)) + 1 for d in order) - 31  # only the last partial window is lost


def test_loader_reads_authors_windows_and_resumes(sp_model, tmp_path):
    write_corpus(tmp_path / "corpus", n_jsonl=30)
    prepare(str(tmp_path / "corpus"), str(tmp_path / "ds"), str(sp_model / "gemma"), val_tokens=64, verbose=False,
            layout="authors", seq_len=32, group_docs=8)
    d = str(tmp_path / "ds")
    rows = torch.from_numpy(load_tokens(d, "train").reshape(-1, 32).astype(np.int64))
    loader = TokenLoader(d, "train", 3, 32, shuffle=False)  # the authors' order: windows as stored
    assert torch.equal(torch.cat([loader.next_batch() for _ in range(2)]), rows[:6])
    shuffled = TokenLoader(d, "train", 3, 32, seed=1)
    for _ in range(4):
        shuffled.next_batch()
    state = json.loads(json.dumps(shuffled.state_dict()))
    assert state["layout"] == "authors"
    expected = [shuffled.next_batch() for _ in range(len(rows))]  # across an epoch boundary
    again = TokenLoader(d, "train", 3, 32, seed=1)
    again.load_state_dict(state)
    assert all(torch.equal(x, again.next_batch()) for x in expected)
    assert all(any(torch.equal(r, w) for w in rows) for x in expected for r in x)  # whole stored windows only
    with pytest.raises(ValueError, match="authors' windows of 32 tokens; got seq_len=16"):
        TokenLoader(d, "train", 3, 16)
    other = arange_dataset(tmp_path / "plain", 32 * 40)
    with pytest.raises(ValueError, match="checkpoint has layout=authors"):
        TokenLoader(other, "train", 3, 32, seed=1).load_state_dict(state)
    old_state = {k: v for k, v in TokenLoader(other, "train", 3, 32, seed=1).state_dict().items() if k != "layout"}
    TokenLoader(other, "train", 3, 32, seed=1).load_state_dict(old_state)  # checkpoints from before layouts
    with pytest.raises(ValueError, match="unknown layout 'gpt'"):
        prepare(str(tmp_path / "corpus"), str(tmp_path / "x"), str(sp_model / "gemma"), layout="gpt", verbose=False)
