"""
The offline corpus: the Python standard library's own sources (the same on every machine with the same Python) as
token shards, with the 4096-token BPE the embedded model uses trained on them, or in a real model's own tokens.
Built once and cached under disk.cache_dir(); pretrain.py, the embedded pipeline and every script without --data use it.
"""
from __future__ import annotations

import io
import json
import os
import time

import data
from formats.tokenizer import Tokenizer, load_tokenizer
from formats import disk
from formats.corpus import read_text, stdlib_files



CORPUS_VOCAB = 4096
CORPUS_VAL_TOKENS = 200_000  # held out: whole files never seen in training


def corpus_and_tokenizer(cache: str | None = None, tokenizer=None) -> tuple[str, str]:
    """Build once and cache the offline default: the stdlib corpus as token shards. Returns (data_dir, tokenizer_path);
    later calls return at once. Without a tokenizer: a 4096-token BPE trained on the corpus (cache/stdlib). With one
    (a model's own: a Tokenizer, file, model folder or hub id), the corpus tokenized by it, cached per tokenizer file
    (cache/stdlib-<sha256 prefix>): a hub model runs without --data, offline once its files are cached."""
    cache = cache or disk.cache_dir()
    if tokenizer is not None:
        tok = tokenizer if isinstance(tokenizer, Tokenizer) else load_tokenizer(tokenizer)
        sha = data._sha256(tok.path)
        if _cached_for(os.path.join(cache, "stdlib"), sha):  # the BPE below, as a model folder's copy of it
            return os.path.join(cache, "stdlib"), tok.path
        root = os.path.join(cache, f"stdlib-{sha[:16]}")
        if not _cached_for(root, sha):
            print(f"embedded corpus: tokenizing the Python standard library with {tok.path}...", flush=True)
            data.prepare("stdlib", root, tok, val_tokens=CORPUS_VAL_TOKENS, seed=0, layout="bos_chunks")
        return root, tok.path
    root = os.path.join(cache, "stdlib")
    tok_path = os.path.join(root, "tokenizer.model")
    if not os.path.isfile(tok_path):
        files = stdlib_files()
        t0 = time.time()
        print(f"embedded corpus: training a {CORPUS_VOCAB}-token BPE tokenizer on {len(files)} stdlib files "
              f"({sum(os.path.getsize(f) for f in files) / 1e6:.1f} MB)...", flush=True)
        train_tokenizer(files, tok_path, CORPUS_VOCAB)
        print(f"embedded corpus: tokenizer written to {tok_path} ({time.time() - t0:.0f}s)", flush=True)
    if not _cached_for(root, data._sha256(tok_path)):
        print("embedded corpus: tokenizing the Python standard library...", flush=True)
        data.prepare("stdlib", root, tok_path, val_tokens=CORPUS_VAL_TOKENS, seed=0, layout="bos_chunks")
    return root, tok_path


def _cached_for(root: str, tokenizer_sha256: str) -> bool:
    meta_path = os.path.join(root, "meta.json")
    if not os.path.isfile(meta_path):
        return False
    with open(meta_path) as f:
        return json.load(f).get("tokenizer_sha256") == tokenizer_sha256


def train_tokenizer(text_files: list[str], out_path: str, vocab_size: int = 4096) -> Tokenizer:
    """A byte-fallback BPE sentencepiece model laid out like Gemma's (pad 0, eos 1, bos 2, unk 3; no normalisation,
    digits split, whitespace runs as pieces), trained single-threaded on the files in the given order: deterministic."""
    import sentencepiece as spm
    texts = [read_text(f) for f in text_files]
    texts = [t for t in texts if t and t.strip()]
    if not texts:
        raise ValueError(f"empty corpus: the {len(text_files)} files given to train_tokenizer hold no text")
    model = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=_chunks_for_sentencepiece(texts), model_writer=model, model_type="bpe",
            vocab_size=vocab_size, byte_fallback=True, split_digits=True, normalization_rule_name="identity",
            add_dummy_prefix=False, remove_extra_whitespaces=False, allow_whitespace_only_pieces=True,
            pad_id=0, eos_id=1, bos_id=2, unk_id=3, character_coverage=0.9995, max_sentence_length=1 << 16,
            input_sentence_size=0, shuffle_input_sentence=False, num_threads=1, minloglevel=2)
    except RuntimeError as e:
        raise ValueError(f"sentencepiece could not train a {vocab_size}-token vocabulary on this corpus: "
                         f"{str(e).strip().splitlines()[-1]}") from None
    with disk.atomic_path(out_path) as tmp, open(tmp, "wb") as f:
        f.write(model.getvalue())
    return Tokenizer(out_path)


def _chunks_for_sentencepiece(texts, max_chars=2000):
    # sentencepiece trains on "sentences" of bounded length (longer ones are dropped): cut each document at line
    # breaks into pieces of about max_chars, keeping the newlines so that code indentation pieces are learnt
    for text in texts:
        buf = ""
        for line in text.splitlines(keepends=True):
            while len(line) > max_chars:
                yield line[:max_chars]
                line = line[max_chars:]
            if buf and len(buf) + len(line) > max_chars:
                yield buf
                buf = ""
            buf += line
        if buf:
            yield buf
