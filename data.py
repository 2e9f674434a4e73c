"""
Token shards and the batch loader (tokenizers: formats/tokenizer.py).

    tok = load_tokenizer("google/gemma-2-2b")                     # formats.tokenizer: a folder, a file or a hub id
    prepare("pile", "data/pile", tok, max_tokens=15_000_000)       # the paper: 15M train tokens, 1M held out (here
                                                                   # 2M: a validation and a test part, 1M each)
    python data.py --source redpajama-v2 --out data/rpv2 --tokenizer google/gemma-2-2b --max-tokens 15360000
    loader = TokenLoader("data/pile", "train", batch_size=8, seq_len=1024)
    x = loader.next_batch()                                        # (8, 1024) int64, every row starts with BOS
    TokenLoader("data/pile", "test", 8, 1024, shuffle=False)       # held out: "validation" (choices) or "test"
    check_data_matches("data/pile", "google/gemma-2-2b")           # one-line error if made with another tokenizer

The offline corpus (the Python standard library's own sources) and its BPE are built by plumbing/embedded.py with prepare.

On disk a dataset is a folder with train.bin / val.bin (flat arrays of token ids) and meta.json saying how to read
them. Two layouts (meta["layout"]; prepare's default is "authors", the embedded corpus uses "bos_chunks"):
  "bos_chunks": each document written as BOS doc EOS, documents in a seeded random order, whole documents in val;
                TokenLoader cuts the stream into spans of seq_len - 1 and puts BOS before each.
  "authors":    the windows of the authors' code, stored as rows of seq_len tokens (chunk_and_tokenize in
                eleuther_sae/sae/data.py, called by utils.py hf_dataset_to_generator and train_sae.py): per group of
                2048 documents, "" + EOS.join(docs) is tokenized into EOS d1 EOS d2 ... and cut into chunks of
                seq_len - 1 tokens, each opened by the BOS the fast tokenizer adds; the group's last chunk is dropped.
                val = the first ceil(val_tokens / seq_len) windows, train = the windows after them, in stream order.
"""
from __future__ import annotations

import hashlib
import itertools
import json
import os
import sys
import time
from dataclasses import dataclass

import numpy as np
import torch

from plumbing import common
from formats import disk
from formats.tokenizer import Tokenizer, load_tokenizer, tokenizer_file
from formats.corpus import HUB_DATASETS, iter_documents


# ----------------------------------------------------------------------------------------------------------------------
# Token shards


def token_dtype(vocab_size: int, dtype: str | None = None) -> np.dtype:
    """uint16 when every id fits (vocab <= 65536), else uint32; an explicit dtype too small is an error."""
    dt = np.dtype(dtype or ("uint16" if vocab_size <= 1 << 16 else "uint32"))
    if dt.kind != "u" or vocab_size > np.iinfo(dt).max + 1:
        raise ValueError(f"a vocabulary of {vocab_size} tokens does not fit dtype {dt.name} "
                         f"(largest id {np.iinfo(dt).max if dt.kind in 'ui' else '?'})")
    return dt


def _sha256(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def _batched(it, n):
    it = iter(it)
    while batch := list(itertools.islice(it, n)):
        yield batch


LAYOUTS = ("bos_chunks", "authors")
AUTHORS_GROUP_DOCS = 2048  # chunk_and_tokenize's data.map(batched=True, batch_size=2048)


def authors_windows(doc_ids: list[list[int]], bos_id: int, eos_id: int, seq_len: int) -> np.ndarray:
    """The windows chunk_and_tokenize makes of one map batch of documents, as an (n, seq_len) int64 array.

    Its text is "" + EOS.join(docs) (eleuther_sae/sae/data.py:52), so the token stream is EOS d1 EOS d2 ... dN: an EOS
    before every document, none after the last (a fast tokenizer reads the EOS string as the EOS id). The tokenizer
    call (max_length=seq_len, truncation, return_overflowing_tokens) cuts the stream into pieces of seq_len - 1
    tokens and its post-processor puts BOS before each (Gemma's and Llama-3's add BOS, not EOS). The last piece is
    dropped whatever its length (`v[:-1]`, data.py:76)."""
    stream = np.fromiter((t for ids in doc_ids for t in (eos_id, *ids)), dtype=np.int64)
    span = seq_len - 1
    n = -(-len(stream) // span) - 1
    rows = np.empty((max(n, 0), seq_len), dtype=np.int64)
    rows[:, 0] = bos_id
    rows[:, 1:] = stream[:rows.shape[0] * span].reshape(-1, span)
    return rows


def prepare(source: str, out_dir: str, tokenizer: Tokenizer | str, max_tokens: int | None = None,
            val_tokens: int = 2_000_000, seed: int = 0, dtype: str | None = None, verbose: bool = True,
            layout: str = "authors", seq_len: int = 1024, group_docs: int = AUTHORS_GROUP_DOCS) -> dict:
    """Tokenize `source` into out_dir/{val,train}.bin + meta.json and return the meta.

    layout "bos_chunks": documents (BOS doc EOS each) fill val.bin first, whole documents, until it holds at least
    `val_tokens` (the paper holds out 1M; the default 2M holds it twice, a validation and a test part of 977 windows
    of 1024 each: held_out_part); the rest go to train.bin, cut at `max_tokens` (required for hub sources:
    they are huge).
    layout "authors": the authors' windows (authors_windows, groups of `group_docs` documents) of `seq_len` tokens;
    val.bin holds the first ceil(val_tokens / seq_len) of them (977 for 1M at 1024, as utils.py:218-220 computes) and
    train.bin the next ceil(max_tokens / seq_len) (max_tokens=15_000 * 1024 is train_lora.py's 15,000 sequences).
    Shards are written under temporary names and renamed only when complete, so an interrupted run leaves none behind.
    """
    if layout not in LAYOUTS:
        raise ValueError(f"unknown layout {layout!r} (expected one of {', '.join(LAYOUTS)})")
    if layout == "authors" and (seq_len < 2 or group_docs < 1):
        raise ValueError(f"layout 'authors' needs seq_len >= 2 and group_docs >= 1, got {seq_len}, {group_docs}")
    tok = tokenizer if isinstance(tokenizer, Tokenizer) else load_tokenizer(tokenizer)
    dt = token_dtype(tok.vocab_size, dtype)
    if source in HUB_DATASETS and max_tokens is None:
        raise ValueError(f"source {source!r} is a hub dataset of billions of tokens: give max_tokens")
    if max_tokens is not None and max_tokens <= 0:
        raise ValueError(f"max_tokens must be positive, got {max_tokens}")
    docs = iter_documents(source, seed)
    os.makedirs(out_dir, exist_ok=True)
    final = {s: os.path.join(out_dir, f"{s}.bin") for s in ("val", "train")}
    tmp = {s: f"{p}.tmp{os.getpid()}" for s, p in final.items()}
    count, n_docs = {"val": 0, "train": 0}, {"val": 0, "train": 0}
    t0 = last = time.time()
    try:
        with open(tmp["val"], "wb") as fv, open(tmp["train"], "wb") as ft:
            if layout == "authors":
                _write_authors_windows(docs, tok, dt, fv, ft, count, n_docs, val_tokens, max_tokens, seq_len,
                                       group_docs, source if verbose else None)
            else:
                for ids in (d for batch in _batched(docs, 64) for d in tok.encode_batch(batch, bos=True, eos=True)):
                    split = "val" if count["val"] < val_tokens else "train"
                    if split == "train" and max_tokens is not None:
                        ids = ids[:max_tokens - count["train"]]
                    (fv if split == "val" else ft).write(np.asarray(ids, dtype=dt).tobytes())
                    count[split] += len(ids)
                    n_docs[split] += 1
                    if max_tokens is not None and count["train"] >= max_tokens:
                        break
                    if verbose and (time.time() - last > 5):
                        last = time.time()
                        total = count["val"] + count["train"]
                        print(f"prepare {source}: {sum(n_docs.values())} docs, {total:,} tokens "
                              f"({total / (last - t0):,.0f} tok/s)", flush=True)
        if count["val"] + count["train"] == 0:
            raise ValueError(f"empty corpus: {source} produced no tokens")
        if count["train"] == 0:
            where = " in whole windows" if layout == "authors" else ""
            raise ValueError(f"{source} has only {count['val']:,} tokens{where}, all taken by "
                             f"val_tokens={val_tokens:,}: lower val_tokens")
        train, hist = np.memmap(tmp["train"], dtype=dt, mode="r"), np.zeros(tok.vocab_size, dtype=np.int64)
        for i in range(0, len(train), 1 << 24):  # in chunks: a billion-token shard need not fit in memory
            hist += np.bincount(train[i:i + (1 << 24)], minlength=tok.vocab_size)[:tok.vocab_size]
        del train
        p = hist / hist.sum()
        meta = {
            "source": source, "tokenizer": os.path.abspath(tok.path), "tokenizer_kind": tok.kind,
            "tokenizer_sha256": _sha256(tok.path), "vocab_size": tok.vocab_size, "bos_id": tok.bos_id,
            "eos_id": tok.eos_id, "dtype": dt.name, "train_tokens": count["train"], "val_tokens": count["val"],
            "train_docs": n_docs["train"], "val_docs": n_docs["val"], "seed": seed, "max_tokens": max_tokens,
            "layout": layout, "python": sys.version.split()[0],
            **({"seq_len": seq_len, "group_docs": group_docs} if layout == "authors" else {}),
            # the loss of a model that ignores context: a pretrained model must get well below it
            "unigram_entropy": float(-(p[p > 0] * np.log(p[p > 0])).sum()),
        }
        # commit: drop the old meta first so a reader never pairs new shards with it, then shards, then the new meta
        if os.path.exists(os.path.join(out_dir, "meta.json")):
            os.remove(os.path.join(out_dir, "meta.json"))
        for s in final:
            os.replace(tmp[s], final[s])
        disk.write_json(os.path.join(out_dir, "meta.json"), meta)
    finally:
        if hasattr(docs, "close"):  # a hub stream stopped early: close its connections now
            docs.close()
        for p in tmp.values():
            if os.path.exists(p):
                os.remove(p)
    if verbose:
        print(f"prepare {source}: wrote {out_dir}: {meta['val_tokens']:,} val + {meta['train_tokens']:,} train tokens "
              f"({meta['val_docs'] + meta['train_docs']} docs) in {time.time() - t0:.1f}s", flush=True)
    return meta


def _write_authors_windows(docs, tok, dt, fv, ft, count, n_docs, val_tokens, max_tokens, seq_len, group_docs,
                           source):
    """prepare's "authors" layout: windows of each group of documents, val first, then train (whole windows)."""
    n_val = -(-val_tokens // seq_len)
    n_train = -(-max_tokens // seq_len) if max_tokens is not None else float("inf")
    t0 = last = time.time()
    for group in _batched(docs, group_docs):  # count[split] is always whole rows of seq_len tokens
        rows = authors_windows(tok.encode_batch(group), tok.bos_id, tok.eos_id, seq_len)
        take_val = min(len(rows), n_val - count["val"] // seq_len)
        take_train = min(len(rows) - take_val, n_train - count["train"] // seq_len)
        for split, part, f in (("val", rows[:take_val], fv), ("train", rows[take_val:take_val + take_train], ft)):
            f.write(part.astype(dt).tobytes())
            count[split] += part.size
            n_docs[split] += int((part == tok.eos_id).sum())  # documents that start inside the split's windows
        if source and time.time() - last > 5:
            last = time.time()
            total = count["val"] + count["train"]
            print(f"prepare {source}: {total:,} tokens in windows ({total / (last - t0):,.0f} tok/s)", flush=True)
        if count["train"] // seq_len >= n_train:
            break


def load_meta(data_dir: str) -> dict:
    meta = disk.read_json(os.path.join(data_dir, "meta.json"),
                          f"{data_dir}: no meta.json (not a token dataset; build one with data.prepare)")
    check_meta(meta, os.path.join(data_dir, "meta.json"))
    return meta


def check_meta(meta, path: str):
    """One ValueError line naming the file and the first value the loaders cannot use (wrong type, null, missing)."""
    if not isinstance(meta, dict):
        raise ValueError(f"{path}: not a JSON object; build the folder again with data.prepare")
    count = lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 0  # noqa: E731
    rules = [("vocab_size", lambda v: count(v) and v > 0, "a whole number above 0"),
             ("train_tokens", count, "a whole number"), ("val_tokens", count, "a whole number"),
             ("dtype", lambda v: isinstance(v, str), "a numpy dtype name such as uint16"),
             ("bos_id", lambda v: v is None or count(v), "a token id or null"),
             ("eos_id", lambda v: v is None or count(v), "a token id or null"),
             ("seq_len", lambda v: v is None or count(v) and v > 1, "a window length or null")]
    for key, fits, what in rules:
        if (key in meta or key in ("vocab_size", "train_tokens", "val_tokens", "dtype")) and not fits(meta.get(key)):
            raise ValueError(f"{path}: {key} is {json.dumps(meta[key]) if key in meta else 'missing'}, expected "
                             f"{what}; build the folder again with data.prepare")


def load_tokens(data_dir: str, split: str) -> np.ndarray:
    """The split's token ids as a read-only np.memmap (nothing is read until used)."""
    if split not in ("train", "val"):
        raise ValueError(f"unknown split {split!r} (expected 'train' or 'val')")
    meta = load_meta(data_dir)
    dt = token_dtype(meta["vocab_size"], meta["dtype"])
    path = os.path.join(data_dir, f"{split}.bin")
    n = meta[f"{split}_tokens"]
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: missing (meta.json lists {n} tokens)")
    if os.path.getsize(path) != n * dt.itemsize:
        raise ValueError(f"{path}: {os.path.getsize(path)} bytes, meta.json implies {n * dt.itemsize} (truncated?)")
    if n == 0:
        return np.zeros(0, dtype=dt)
    return np.memmap(path, dtype=dt, mode="r")


def check_data_matches(data_dir: str, model, tokenizer: Tokenizer | str | None = None) -> dict:
    """Raise one ValueError line if the token folder was not made for this model: its vocabulary size differs from
    the model's, it holds ids beyond the model's vocabulary, its BOS/EOS differ from the model's, or its tokenizer file
    (sha256 in meta.json) is not the tokenizer given or, without one, the model folder's own. `model` is a ModelConfig,
    a model (with .cfg), or a model folder / hub id (config.json and tokenizer read from it). Returns the meta."""
    meta, model_dir = load_meta(data_dir), None
    cfg = getattr(model, "cfg", model)
    if isinstance(cfg, (str, os.PathLike)):
        from formats.checkpoint import read_config, resolve_model_dir
        from model import ModelConfig
        model_dir = resolve_model_dir(str(cfg))
        cfg = ModelConfig.from_hf(read_config(model_dir))
    name = model_dir or "the model"
    if meta["vocab_size"] != cfg.vocab_size:
        raise ValueError(f"{data_dir}: tokens of a {meta['vocab_size']}-token vocabulary, but {name} has "
                         f"{cfg.vocab_size}: tokenize the data with the model's own tokenizer")
    for split in ("train", "val"):
        tokens = load_tokens(data_dir, split)
        top = max((int(tokens[i:i + (1 << 24)].max()) for i in range(0, len(tokens), 1 << 24)), default=-1)
        if top >= cfg.vocab_size:
            raise ValueError(f"{data_dir}: {split}.bin holds token id {top}, beyond the vocabulary of {name} "
                             f"({cfg.vocab_size}): corrupt shards or another tokenizer")
    eos = cfg.eos_token_id if isinstance(cfg.eos_token_id, list) else [cfg.eos_token_id]
    if cfg.bos_token_id is not None and meta.get("bos_id") != cfg.bos_token_id:
        raise ValueError(f"{data_dir}: documents start with BOS id {meta.get('bos_id')}, {name} uses "
                         f"{cfg.bos_token_id}: tokenize the data with the model's own tokenizer")
    if cfg.eos_token_id is not None and meta.get("eos_id") not in eos:
        raise ValueError(f"{data_dir}: documents end with EOS id {meta.get('eos_id')}, {name} uses "
                         f"{cfg.eos_token_id}: tokenize the data with the model's own tokenizer")
    if tokenizer is not None:
        tok_path = (tokenizer if isinstance(tokenizer, Tokenizer) else load_tokenizer(tokenizer)).path
    else:  # the model folder's own tokenizer, where it has one
        tok_path = tokenizer_file(model_dir) if model_dir else None
    if meta.get("tokenizer_sha256") and tok_path and _sha256(tok_path) != meta["tokenizer_sha256"]:
        raise ValueError(f"{data_dir}: tokenized with {meta.get('tokenizer')}, a different file from {tok_path} "
                         f"(sha256 differs): tokenize the data again with {tok_path}")
    return meta


# ----------------------------------------------------------------------------------------------------------------------
# The batch loader

# The held-out split (val.bin) in two parts: every choice (lr, budget, k, layer) is made on "validation" and every
# reported number measured on "test", so no reported number is read on the tokens that chose it.
HELD_OUT_PARTS = ("validation", "test")
HELD_OUT_SEED = 0  # fixed, not a run's --seed: runs with different seeds are measured on the same windows


def held_out_part(n_windows: int, part: str, seed: int = HELD_OUT_SEED) -> np.ndarray:
    """The windows of `part` among the held-out split's `n_windows`, in the order an evaluation reads them.

    The split is cut into consecutive pairs of windows and a seeded coin sends one of each pair to validation, the
    other to test (an odd last window to neither): both parts run through the whole split, so each holds a whole
    window of every held-out document as long as four windows. The order is a seeded permutation of the part: an
    evaluation budget smaller than the part reads windows drawn from across the split, not its first documents."""
    if part not in HELD_OUT_PARTS:
        raise ValueError(f"unknown held-out part {part!r} (expected one of {', '.join(HELD_OUT_PARTS)})")
    pairs = n_windows // 2
    coin = np.random.default_rng([seed, n_windows]).integers(0, 2, pairs)
    mine = 2 * np.arange(pairs) + (coin if part == "validation" else 1 - coin)
    return mine[np.random.default_rng([seed, n_windows, 1 + HELD_OUT_PARTS.index(part)]).permutation(pairs)]



class TokenLoader:
    """Windows of seq_len tokens, each BOS followed by the next seq_len - 1 tokens of the stream ("bos_chunks"), or
    the stored rows of an "authors" dataset (its windows are made by prepare; seq_len must be the one it used).

    Packing ("bos_chunks"): the stream is cut into consecutive spans of seq_len - 1 tokens and BOS is prepended to
    each, so every window starts with BOS like a fresh document (Gemma and Llama are trained with BOS first; BOS
    position activations are outliers that SAE pipelines treat apart) and every token is read once per epoch. A span
    that happens to begin at a document's own BOS shows BOS twice; that costs nothing. (Left over each epoch: the
    tail shorter than one span, and the few spans beyond an equal split across ranks.)

    An epoch is a permutation of the spans (seeded by (seed, epoch); the identity when shuffle=False); rank r of
    world_size takes every world_size-th span of it starting at r, so ranks never share a window and together they
    see, step by step, the windows of a single process whose batch is the global batch. The position (epoch, index)
    is the whole state: `state_dict` / `load_state_dict` resume exactly.

    split: "train", "val" (the whole held-out split, in order) or one of its parts, "validation" / "test"
    (held_out_part: its windows only, in its own order; shuffle=False keeps that order).
    """

    def __init__(self, data_dir: str, split: str, batch_size: int, seq_len: int, rank: int = 0, world_size: int = 1,
                 seed: int = 0, shuffle: bool = True, device="cpu"):
        if seq_len < 2 or batch_size < 1:
            raise ValueError(f"need seq_len >= 2 and batch_size >= 1, got seq_len={seq_len}, batch_size={batch_size}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside world_size {world_size}")
        self.tokens = load_tokens(data_dir, "val" if split in HELD_OUT_PARTS else split)
        meta = load_meta(data_dir)
        self.bos_id = meta["bos_id"]
        # a meta.json whose `layout` is missing or not a layout name (a free-text description) holds bos_chunks shards
        self.layout = meta.get("layout") if meta.get("layout") in LAYOUTS else "bos_chunks"
        if self.layout == "authors" and meta.get("seq_len") != seq_len:
            raise ValueError(f"{data_dir} holds the authors' windows of {meta.get('seq_len')} tokens; got "
                             f"seq_len={seq_len} (prepare it again with seq_len={seq_len})")
        # a window is a stored row ("authors") or BOS + the next seq_len - 1 tokens of the stream
        self.span = seq_len if self.layout == "authors" else seq_len - 1
        self.batch_size, self.seq_len = batch_size, seq_len
        self.rank, self.world_size, self.seed, self.shuffle = rank, world_size, seed, shuffle
        self.device = torch.device(device)
        self.n_windows = len(self.tokens) // self.span
        self.part = held_out_part(self.n_windows, split) if split in HELD_OUT_PARTS else None
        if self.part is not None:
            self.n_windows = len(self.part)
        self.per_rank = self.n_windows // world_size
        if self.per_rank == 0:
            raise ValueError(f"seq_len {seq_len} is larger than the data: {data_dir} {split} has {len(self.tokens)} "
                             f"tokens, fewer than one window of {self.span} per rank for {world_size} rank(s)")
        self.epoch, self.pos = 0, 0
        self._order_epoch, self._order = None, None

    def _my_windows(self) -> np.ndarray:
        if self._order_epoch != self.epoch:
            order = (np.random.default_rng([self.seed, self.epoch]).permutation(self.n_windows) if self.shuffle
                     else np.arange(self.n_windows))
            # strided: rank r takes windows r, r + W, r + 2W, ... so that at every step the ranks' batches together
            # are exactly the batch one process with the global batch size would take (DDP == single process)
            self._order = order[self.rank:self.per_rank * self.world_size:self.world_size]
            if self.part is not None:  # positions in the part -> windows of the held-out split
                self._order = self.part[self._order]
            self._order_epoch = self.epoch
        return self._order

    def next_batch(self) -> torch.Tensor:
        x = np.empty((self.batch_size, self.seq_len), dtype=np.int64)
        first = self.seq_len - self.span  # 1: BOS goes first; 0: the stored row is the whole window
        x[:, 0] = self.bos_id
        for row in range(self.batch_size):
            if self.pos == self.per_rank:  # epoch done: the next one is a new permutation
                self.epoch, self.pos = self.epoch + 1, 0
            w = int(self._my_windows()[self.pos])
            x[row, first:] = self.tokens[w * self.span:(w + 1) * self.span]
            self.pos += 1
        t = torch.from_numpy(x)
        if self.device.type == "cuda":
            return t.pin_memory().to(self.device, non_blocking=True)
        return t.to(self.device)

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "pos": self.pos, "seed": self.seed, "seq_len": self.seq_len,
                "world_size": self.world_size, "n_windows": self.n_windows, "shuffle": self.shuffle,
                "layout": self.layout}

    def load_state_dict(self, d: dict):
        d = {"layout": "bos_chunks", **d}  # a loader state without a layout: the bos_chunks stream (its only kind)
        for k in ("layout", "seq_len", "world_size", "n_windows", "seed", "shuffle"):
            if d[k] != getattr(self, k):
                raise ValueError(f"cannot resume the data position: checkpoint has {k}={d[k]}, this run "
                                 f"{getattr(self, k)} (same data, layout, seq_len, seed and process count needed)")
        self.epoch, self.pos = d["epoch"], d["pos"]


# ----------------------------------------------------------------------------------------------------------------------
# Command line: prepare as a script


def held_out_batches(loader: TokenLoader, batches: int, asked: str, fewer: str) -> list[torch.Tensor]:
    """The first `batches` batches of a held-out loader (shuffle=False), never more than its split holds: a larger
    budget is capped to the split's whole batches with a log line that says so (`asked`: the flag and value that asked
    for it), so no window is read twice. A split with not one whole batch per process is a ValueError line (`fewer`:
    what to lower). adapt.py and eval.py turn --eval-tokens into `batches` the same way (eval_batches_for)."""
    have = loader.per_rank // loader.batch_size
    if have == 0:
        raise ValueError(f"the held-out split holds {loader.per_rank} windows of {loader.seq_len} tokens per process, "
                         f"fewer than one batch of {loader.batch_size}: lower {fewer}")
    if batches > have:
        windows = have * loader.batch_size * loader.world_size
        common.log(f"{asked} asks for more than the held-out split holds: evaluating on all of it, {have} batches "
                   f"({windows} windows of {loader.seq_len}, {windows * loader.seq_len:,} tokens); no window twice")
    return [loader.next_batch() for _ in range(min(batches, have))]


def eval_batches_for(eval_tokens: int, batch: int, seq_len: int, world_size: int = 1) -> int:
    """--eval-tokens as batches of `batch` windows per process: whole windows, rounded up to whole batches (the
    authors' utils.py rounds up too: 977 windows of 1024 for 1M tokens)."""
    return -(-eval_tokens // (batch * seq_len * world_size))


@dataclass
class PrepareConfig:
    """Tokenize a corpus into a token folder (train.bin, val.bin, meta.json), the --data of every script."""
    source: str = "stdlib"  # stdlib | pile | redpajama (RedPajama-1T-Sample) | redpajama-v2 (the paper's: V2
    # sample-10B, from data.together.xyz or LORASAE_RPV2_URL) | a .txt/.jsonl file or a folder of them
    out: str = ""  # the token folder to write (required): a new or empty folder
    overwrite: bool = False  # --out holds files: replace train.bin, val.bin and meta.json there (runs that read the
    # folder then read the new tokens)
    tokenizer: str = ""  # the model's tokenizer: a model folder, a tokenizer file or a hub id (required)
    max_tokens: int | None = None  # train tokens (required for hub sources; train_lora.py: 15000 x 1024)
    val_tokens: int = 2_000_000  # held-out tokens, written first (the authors hold out 1M: here twice, a validation
    # and a test part of 1M each, data.held_out_part)
    layout: str = "authors"  # authors (their windows, token by token) | bos_chunks
    seq_len: int = 1024  # window length of the authors layout
    seed: int = 0  # document order of the stdlib and local sources (hub streams keep theirs)

    def __post_init__(self):  # every value checked as it is parsed: one line naming the flag
        common.check_flags(self, positive=("max_tokens", "seq_len"), non_negative=("val_tokens", "seed"),
                           choices=dict(layout=LAYOUTS))


def main(argv=None) -> dict:
    cfg, _ = common.parse_args(PrepareConfig, argv)
    if not cfg.out or not cfg.tokenizer:
        raise ValueError("--out and --tokenizer are required (the token folder to write, the model's tokenizer)")
    from formats import run_folder
    with run_folder.claim(cfg.out, overwrite=cfg.overwrite, outputs=("train.bin", "val.bin", "meta.json"),
                          inputs=[cfg.source, cfg.tokenizer]):
        return prepare(cfg.source, cfg.out, cfg.tokenizer, cfg.max_tokens, cfg.val_tokens, cfg.seed,
                       layout=cfg.layout, seq_len=cfg.seq_len)


if __name__ == "__main__":
    common.cli(main)
