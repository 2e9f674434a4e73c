"""data.py: tokenizers (Llama-3 tiktoken format, Gemma sentencepiece), token shards, the BOS-packed batch loader."""
import base64
import collections
import json
import os
import sys

import numpy as np
import pytest
import torch

import data
from formats import stdlib_corpus
from formats.corpus import stdlib_files
from data import TokenLoader, check_data_matches, load_meta, load_tokens, prepare, token_dtype
from formats.tokenizer import LLAMA3_SPECIALS, load_tokenizer
from formats.stdlib_corpus import train_tokenizer

UNICODE_DOC = "naïve café — 東京 🚀\n\tdef f(x):\n        return x  +  1   # spaces  kept\n\n\n"


def stdlib_text(*names):
    root = os.path.dirname(os.__file__)
    return [open(os.path.join(root, n), encoding="utf-8").read() for n in names]


def write_corpus(folder, n_jsonl=0):
    """A few KB of real text: some stdlib modules as .txt files, a unicode doc, and optional jsonl documents."""
    os.makedirs(folder, exist_ok=True)
    docs = stdlib_text("textwrap.py", "fnmatch.py", "bisect.py") + [UNICODE_DOC]
    for i, d in enumerate(docs):
        with open(os.path.join(folder, f"doc{i}.txt"), "w", encoding="utf-8", newline="") as f:
            f.write(d)
    extra = [f"record {i}: the value is {i * i} and the word is {'abcdefgh'[i % 8] * (i % 5 + 1)}"
             for i in range(n_jsonl)]
    if n_jsonl:
        with open(os.path.join(folder, "more.jsonl"), "w", encoding="utf-8") as f:
            for j, e in enumerate(extra):  # both accepted forms: {"text": ...} objects and bare strings
                f.write(json.dumps({"text": e} if j % 2 else e) + "\n")
    return docs + extra


@pytest.fixture(scope="module")
def sp_model(tmp_path_factory):
    folder = tmp_path_factory.mktemp("sp")
    write_corpus(folder / "corpus")
    files = sorted(str(p) for p in (folder / "corpus").iterdir())
    train_tokenizer(files, str(folder / "gemma" / "tokenizer.model"), vocab_size=400)
    return folder


# ----------------------------------------------------------------------------------------------------------------------
# Tokenizers


def mini_bpe_ranks(text: str, n_merges: int) -> dict[bytes, int]:
    """Train a byte-level BPE the way tiktoken's rank files encode it: 256 single bytes first, then each merge."""
    ranks = {bytes([b]): i for i, b in enumerate(np.random.default_rng(0).permutation(256))}
    words = [[bytes([b]) for b in w.encode()] for w in text.split(" ")]
    for _ in range(n_merges):
        pairs = collections.Counter((a, b) for w in words for a, b in zip(w, w[1:]))
        if not pairs:
            break
        (a, b), _ = pairs.most_common(1)[0]
        ranks[a + b] = len(ranks)
        for w in words:
            i = 0
            while i < len(w) - 1:
                if w[i] == a and w[i + 1] == b:
                    w[i:i + 2] = [a + b]
                i += 1
    return ranks


def test_llama3_tiktoken_file_loads_and_round_trips(tmp_path):
    sample = " ".join(stdlib_text("bisect.py")) * 2
    ranks = mini_bpe_ranks(sample, n_merges=60)
    (tmp_path / "original").mkdir()
    with open(tmp_path / "original" / "tokenizer.model", "wb") as f:  # Llama-3's format: base64 token, space, rank
        for tok, rank in sorted(ranks.items(), key=lambda kv: kv[1]):
            f.write(base64.b64encode(tok) + b" %d\n" % rank)
    tok = load_tokenizer(str(tmp_path))  # a Llama-3 hub folder keeps the file under original/
    n_base = len(ranks)
    assert tok.kind == "tiktoken"
    # specials numbered after the base ranks as in Llama-3 (where n_base = 128000 gives bos 128000, eos 128001)
    assert (tok.bos_id, tok.eos_id, tok.vocab_size) == (n_base, n_base + 1, n_base + 256)
    assert tok.decode([n_base + LLAMA3_SPECIALS.index("<|eot_id|>")]) == "<|eot_id|>"
    text = "def insort(a, x):\n    return bisect(a, x)  # naïve 東京 <|eot_id|>\n"
    ids = tok.encode(text, bos=True, eos=True)
    assert ids[0] == tok.bos_id and ids[-1] == tok.eos_id
    assert tok.decode(ids) == "<|begin_of_text|>" + text + "<|end_of_text|>"
    # special strings inside text stay text (Meta's default): only bos/eos flags produce special ids
    assert all(i < n_base for i in ids[1:-1])
    # the merges are used: fewer tokens than bytes on text like the training sample
    body = stdlib_text("bisect.py")[0]
    assert len(tok.encode(body)) < 0.8 * len(body.encode())
    assert tok.decode(tok.encode(body)) == body


def test_sentencepiece_model_loads_as_gemma_folder(sp_model, tmp_path):
    tok = load_tokenizer(str(sp_model / "gemma"))
    assert tok.kind == "sentencepiece"
    assert (tok.pad_id, tok.eos_id, tok.bos_id, tok.vocab_size) == (0, 1, 2, 400)  # Gemma's id layout
    for text in [UNICODE_DOC, stdlib_text("fnmatch.py")[0]]:
        ids = tok.encode(text, bos=True, eos=True)
        assert ids[0] == 2 and ids[-1] == 1
        assert tok.decode(ids) == text  # identity normalisation + byte fallback: exact round trip
    assert len(tok.encode(stdlib_text("fnmatch.py")[0])) < 0.6 * len(stdlib_text("fnmatch.py")[0])
    # the same file also loads by path, and training is deterministic
    assert load_tokenizer(str(sp_model / "gemma" / "tokenizer.model")).encode(UNICODE_DOC) == tok.encode(UNICODE_DOC)
    files = sorted(str(p) for p in (sp_model / "corpus").iterdir())
    again = train_tokenizer(files, str(tmp_path / "again.model"), vocab_size=400)
    assert open(again.path, "rb").read() == open(tok.path, "rb").read()


def test_tokenizer_bad_input(tmp_path):
    with pytest.raises(FileNotFoundError, match="no tokenizer.model"):
        load_tokenizer(str(tmp_path))
    with pytest.raises(FileNotFoundError, match="no such tokenizer"):
        load_tokenizer(str(tmp_path / "missing.model"))
    (tmp_path / "junk.model").write_bytes(b"\x00\x01garbage")
    with pytest.raises(ValueError, match="neither a sentencepiece model nor a tiktoken"):
        load_tokenizer(str(tmp_path / "junk.model"))
    (tmp_path / "gappy.model").write_bytes(b"YQ== 0\nYg== 5\n")
    with pytest.raises(ValueError, match="ranks are not"):
        load_tokenizer(str(tmp_path / "gappy.model"))
    (tmp_path / "empty.txt").write_text("  \n")
    with pytest.raises(ValueError, match="empty corpus"):
        train_tokenizer([str(tmp_path / "empty.txt")], str(tmp_path / "t.model"))


# ----------------------------------------------------------------------------------------------------------------------
# Shards


def split_documents(tokens, bos, eos):
    """Cut a shard back into documents at its BOS ... EOS markers."""
    docs, cur = [], None
    for t in tokens.tolist():
        if t == bos:
            cur = []
        elif t == eos:
            docs.append(cur)
            cur = None
        else:
            cur.append(t)
    assert cur is None, "shard ends inside a document"
    return docs


def test_prepare_writes_shards_that_decode_to_the_input(sp_model, tmp_path):
    docs = write_corpus(tmp_path / "corpus", n_jsonl=40)
    tok = load_tokenizer(str(sp_model / "gemma"))
    meta = prepare(str(tmp_path / "corpus"), str(tmp_path / "ds"), tok, val_tokens=200, seed=3, verbose=False, layout="bos_chunks")
    assert meta["dtype"] == "uint16" and meta["val_tokens"] >= 200 and meta["train_tokens"] > 0
    assert 0 < meta["unigram_entropy"] < np.log(tok.vocab_size)
    decoded = []
    for split in ("val", "train"):
        tokens = load_tokens(str(tmp_path / "ds"), split)
        assert isinstance(tokens, np.memmap) and tokens.dtype == np.uint16
        assert len(tokens) == meta[f"{split}_tokens"]
        pieces = split_documents(tokens, tok.bos_id, tok.eos_id)
        assert len(pieces) == meta[f"{split}_docs"]
        decoded += [tok.decode(p) for p in pieces]
    assert sorted(decoded) == sorted(docs)  # every document exactly once, byte for byte, val and train disjoint
    # deterministic for a seed; another seed changes the document order
    again = prepare(str(tmp_path / "corpus"), str(tmp_path / "ds2"), tok, val_tokens=200, seed=3, verbose=False, layout="bos_chunks")
    assert again == meta
    assert (tmp_path / "ds" / "train.bin").read_bytes() == (tmp_path / "ds2" / "train.bin").read_bytes()
    prepare(str(tmp_path / "corpus"), str(tmp_path / "ds3"), tok, val_tokens=200, seed=4, verbose=False, layout="bos_chunks")
    assert (tmp_path / "ds" / "train.bin").read_bytes() != (tmp_path / "ds3" / "train.bin").read_bytes()
    # max_tokens cuts train exactly; uint32 on request
    capped = prepare(str(tmp_path / "corpus"), str(tmp_path / "ds4"), tok, max_tokens=123, val_tokens=0,
                     dtype="uint32", verbose=False, layout="bos_chunks")
    assert capped["train_tokens"] == 123 and load_tokens(str(tmp_path / "ds4"), "train").dtype == np.uint32


def test_prepare_bad_input(sp_model, tmp_path):
    tok = load_tokenizer(str(sp_model / "gemma"))
    out = str(tmp_path / "ds")
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "a.txt").write_text("\n\n  ")
    with pytest.raises(ValueError, match="empty corpus"):
        prepare(str(tmp_path / "empty"), out, tok, verbose=False, layout="bos_chunks")
    (tmp_path / "nothing").mkdir()
    with pytest.raises(ValueError, match="empty corpus"):
        prepare(str(tmp_path / "nothing"), out, tok, verbose=False, layout="bos_chunks")
    with pytest.raises(ValueError, match="unknown source 'wikipedia'"):
        prepare("wikipedia", out, tok, verbose=False, layout="bos_chunks")
    with pytest.raises(ValueError, match="does not fit dtype uint8"):
        prepare(str(tmp_path / "empty"), out, tok, dtype="uint8", verbose=False, layout="bos_chunks")
    with pytest.raises(ValueError, match="128256 tokens does not fit dtype uint16"):
        token_dtype(128256, "uint16")  # Llama-3's vocabulary
    assert token_dtype(128256) == np.uint32 and token_dtype(65536) == np.uint16
    with pytest.raises(ValueError, match="give max_tokens"):
        prepare("pile", out, tok, verbose=False, layout="bos_chunks")
    with pytest.raises(FileNotFoundError, match="no such tokenizer"):
        prepare(str(tmp_path / "empty"), out, str(tmp_path / "nope.model"), verbose=False, layout="bos_chunks")
    assert not os.path.exists(out) or not os.listdir(out)


def test_pile_without_zstandard_is_a_clear_error(monkeypatch, sp_model, tmp_path):
    monkeypatch.setitem(sys.modules, "zstandard", None)  # makes `import zstandard` fail even where it is installed
    with pytest.raises(ImportError, match="pip install zstandard"):
        prepare("pile", str(tmp_path / "ds"), str(sp_model / "gemma"), max_tokens=1000, verbose=False, layout="bos_chunks")


def test_interrupted_prepare_leaves_no_shard(monkeypatch, sp_model, tmp_path):
    write_corpus(tmp_path / "corpus", n_jsonl=300)  # > one 64-document batch
    tok = load_tokenizer(str(sp_model / "gemma"))
    calls = {"n": 0}
    real = tok.encode_batch

    def crash_on_second_batch(*a, **k):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt("simulated interruption")
        return real(*a, **k)

    monkeypatch.setattr(tok, "encode_batch", crash_on_second_batch)
    with pytest.raises(KeyboardInterrupt):
        prepare(str(tmp_path / "corpus"), str(tmp_path / "ds"), tok, val_tokens=100, verbose=False, layout="bos_chunks")
    assert os.listdir(tmp_path / "ds") == []  # neither shards nor temporary files nor meta
    # interrupting a rebuild keeps the previous complete dataset intact
    monkeypatch.setattr(tok, "encode_batch", real)
    meta = prepare(str(tmp_path / "corpus"), str(tmp_path / "ds"), tok, val_tokens=100, verbose=False, layout="bos_chunks")
    before = (tmp_path / "ds" / "train.bin").read_bytes()
    calls["n"] = 0
    monkeypatch.setattr(tok, "encode_batch", crash_on_second_batch)
    with pytest.raises(KeyboardInterrupt):
        prepare(str(tmp_path / "corpus"), str(tmp_path / "ds"), tok, val_tokens=100, seed=9, verbose=False, layout="bos_chunks")
    assert sorted(os.listdir(tmp_path / "ds")) == ["meta.json", "train.bin", "val.bin"]
    assert (tmp_path / "ds" / "train.bin").read_bytes() == before and load_meta(str(tmp_path / "ds")) == meta


def test_load_tokens_bad_input(sp_model, tmp_path):
    with pytest.raises(FileNotFoundError, match="no meta.json"):
        load_tokens(str(tmp_path), "train")
    write_corpus(tmp_path / "corpus")
    prepare(str(tmp_path / "corpus"), str(tmp_path / "ds"), str(sp_model / "gemma"), val_tokens=10, verbose=False, layout="bos_chunks")
    with pytest.raises(ValueError, match="unknown split"):
        load_tokens(str(tmp_path / "ds"), "test")
    meta = load_meta(str(tmp_path / "ds"))
    with open(tmp_path / "ds" / "meta.json", "w") as f:  # a vocabulary the stored dtype cannot hold
        json.dump({**meta, "vocab_size": 128256}, f)
    with pytest.raises(ValueError, match="does not fit dtype uint16"):
        load_tokens(str(tmp_path / "ds"), "train")
    with open(tmp_path / "ds" / "meta.json", "w") as f:
        json.dump({**meta, "train_tokens": meta["train_tokens"] + 7}, f)
    with pytest.raises(ValueError, match="truncated"):
        load_tokens(str(tmp_path / "ds"), "train")


# ----------------------------------------------------------------------------------------------------------------------
# Loader


BOS = 65535


def arange_dataset(folder, n_tokens):
    """A dataset whose token at stream position i is i (below BOS), so a window names its own start position."""
    os.makedirs(folder, exist_ok=True)
    np.arange(n_tokens, dtype=np.uint16).tofile(os.path.join(folder, "train.bin"))
    np.arange(0, dtype=np.uint16).tofile(os.path.join(folder, "val.bin"))
    with open(os.path.join(folder, "meta.json"), "w") as f:
        json.dump({"vocab_size": 65536, "dtype": "uint16", "bos_id": BOS, "eos_id": BOS - 1,
                   "train_tokens": n_tokens, "val_tokens": 0}, f)
    return str(folder)


def window_starts(batch):
    return batch[:, 1].tolist()


def test_loader_windows_start_with_bos_and_follow_the_stream(tmp_path):
    d = arange_dataset(tmp_path, 1000)
    loader = TokenLoader(d, "train", batch_size=4, seq_len=10, shuffle=False)
    x = loader.next_batch()
    assert x.shape == (4, 10) and x.dtype == torch.int64 and x.device.type == "cpu"
    assert (x[:, 0] == BOS).all()
    # sequential: BOS + consecutive spans of seq_len - 1 tokens
    assert torch.equal(x[:, 1:], torch.arange(36).view(4, 9))
    shuffled = TokenLoader(d, "train", batch_size=4, seq_len=10, seed=1)
    for _ in range(30):
        x = shuffled.next_batch()
        assert (x[:, 0] == BOS).all()
        assert all(s % 9 == 0 for s in window_starts(x))
        assert torch.equal(x[:, 1:] - x[:, 1:2], torch.arange(9).expand(4, 9))


def epoch_windows(loader, n_batches):
    return [s for _ in range(n_batches) for s in window_starts(loader.next_batch())]


def test_loader_ranks_disjoint_and_epochs_reshuffle(tmp_path):
    d = arange_dataset(tmp_path, 9 * 60 + 5)  # 60 windows of 9 tokens, 20 per rank with 3 ranks
    per_rank = {r: epoch_windows(TokenLoader(d, "train", 5, 10, rank=r, world_size=3, seed=7), 4) for r in range(3)}
    sets = [set(v) for v in per_rank.values()]
    assert all(len(s) == 20 for s in sets)  # each rank sees each of its windows once per epoch
    assert not (sets[0] & sets[1]) and not (sets[0] & sets[2]) and not (sets[1] & sets[2])
    assert set().union(*sets) == {9 * i for i in range(60)}
    loader = TokenLoader(d, "train", 5, 10, seed=7)
    e0, e1 = epoch_windows(loader, 12), epoch_windows(loader, 12)
    assert sorted(e0) == sorted(e1) and e0 != e1 and loader.epoch == 1
    assert epoch_windows(TokenLoader(d, "train", 5, 10, seed=7), 12) == e0  # same seed, same order
    assert epoch_windows(TokenLoader(d, "train", 5, 10, seed=8), 12) != e0


def test_loader_resume_continues_at_saved_position(tmp_path):
    d = arange_dataset(tmp_path, 9 * 23)  # 23 windows, batch 4: batches straddle epoch ends
    a = TokenLoader(d, "train", 4, 10, seed=3)
    for _ in range(5):
        a.next_batch()
    state = json.loads(json.dumps(a.state_dict()))  # survives a round trip through a checkpoint file
    expected = [a.next_batch() for _ in range(10)]
    b = TokenLoader(d, "train", 4, 10, seed=3)
    b.load_state_dict(state)
    assert all(torch.equal(x, b.next_batch()) for x in expected)
    fresh = TokenLoader(d, "train", 4, 10, seed=3)
    assert not torch.equal(fresh.next_batch(), expected[0])
    with pytest.raises(ValueError, match="seq_len=10"):
        TokenLoader(d, "train", 4, 12, seed=3).load_state_dict(state)


def test_loader_bad_input(tmp_path):
    d = arange_dataset(tmp_path, 100)
    with pytest.raises(ValueError, match="seq_len 200 is larger than the data"):
        TokenLoader(d, "train", 2, 200)
    with pytest.raises(ValueError, match="larger than the data"):
        TokenLoader(d, "val", 2, 8)  # empty split
    with pytest.raises(ValueError, match="rank 2 is outside"):
        TokenLoader(d, "train", 2, 8, rank=2, world_size=2)


# ----------------------------------------------------------------------------------------------------------------------
# The embedded default


def test_stdlib_files_are_deterministic_library_sources():
    files = stdlib_files()
    assert files == stdlib_files() and len(files) > 200
    assert all(f.endswith(".py") for f in files)
    parts = [set(f.split(os.sep)) for f in files]
    assert not any(p & {"site-packages", "test", "tests"} for p in parts)
    assert any(f.endswith(os.sep + "textwrap.py") for f in files)


def test_embedded_dataset_is_built_once(tmp_path, monkeypatch):
    monkeypatch.setattr(stdlib_corpus, "CORPUS_VAL_TOKENS", 20_000)
    real_files = stdlib_files()
    monkeypatch.setattr(stdlib_corpus, "stdlib_files", lambda: real_files[:40])  # a slice keeps the test to seconds
    monkeypatch.setenv("LORASAE_CACHE", str(tmp_path / "c"))
    data_dir, tok_path = stdlib_corpus.corpus_and_tokenizer()
    assert data_dir.startswith(str(tmp_path / "c"))
    meta = load_meta(data_dir)
    assert meta["source"] == "stdlib" and meta["vocab_size"] == 4096 and meta["val_tokens"] >= 20_000
    assert load_tokenizer(tok_path).vocab_size == 4096
    stamp = os.path.getmtime(os.path.join(data_dir, "train.bin"))
    assert stdlib_corpus.corpus_and_tokenizer() == (data_dir, tok_path)
    assert os.path.getmtime(os.path.join(data_dir, "train.bin")) == stamp  # cached, not rebuilt


def test_embedded_dataset_with_a_models_tokenizer_is_cached_per_tokenizer(tmp_path, monkeypatch, sp_model):
    from model import ModelConfig
    monkeypatch.setattr(stdlib_corpus, "CORPUS_VAL_TOKENS", 5_000)
    real_files = stdlib_files()
    monkeypatch.setattr(stdlib_corpus, "stdlib_files", lambda: real_files[:20])
    model_dir = gemma_folder(tmp_path / "model", sp_model, ModelConfig.from_name("tiny-gemma2"))
    data_dir, tok_path = stdlib_corpus.corpus_and_tokenizer(str(tmp_path / "c"), tokenizer=str(model_dir))  # a model folder
    sha = data._sha256(str(sp_model / "gemma" / "tokenizer.model"))
    assert data_dir == str(tmp_path / "c" / f"stdlib-{sha[:16]}") and tok_path == str(model_dir / "tokenizer.model")
    meta = load_meta(data_dir)
    assert (meta["vocab_size"], meta["tokenizer_sha256"], meta["source"]) == (400, sha, "stdlib")
    stamp = os.path.getmtime(os.path.join(data_dir, "train.bin"))
    assert stdlib_corpus.corpus_and_tokenizer(str(tmp_path / "c"), tokenizer=load_tokenizer(tok_path)) == (data_dir, tok_path)
    assert os.path.getmtime(os.path.join(data_dir, "train.bin")) == stamp  # cached, not rebuilt
    assert check_data_matches(data_dir, str(model_dir))["vocab_size"] == 400
    assert not os.path.exists(tmp_path / "c" / "stdlib")  # the default BPE is not trained for a model's tokenizer


def gemma_folder(folder, sp_model, cfg, vocab=400):
    """A model folder (config.json + the sentencepiece tokenizer) without weights: all check_data_matches reads."""
    import shutil
    os.makedirs(folder, exist_ok=True)
    cfg.vocab_size = vocab
    (folder / "config.json").write_text(json.dumps(cfg.to_hf()))
    shutil.copy(sp_model / "gemma" / "tokenizer.model", folder / "tokenizer.model")
    return folder


def test_check_data_matches_one_line_per_mismatch(tmp_path, sp_model):
    from model import ModelConfig
    write_corpus(tmp_path / "corpus")
    d = str(tmp_path / "ds")
    prepare(str(tmp_path / "corpus"), d, load_tokenizer(str(sp_model / "gemma")), val_tokens=200, verbose=False, layout="bos_chunks")
    cfg = lambda **kw: ModelConfig(**{**ModelConfig.from_name("tiny-gemma2").__dict__, "vocab_size": 400, **kw})  # noqa
    assert check_data_matches(d, cfg())["vocab_size"] == 400
    assert check_data_matches(d, cfg(eos_token_id=[7, 1]), tokenizer=str(sp_model / "gemma"))
    bad = [(cfg(vocab_size=512), "tokens of a 400-token vocabulary, but the model has 512"),
           (cfg(bos_token_id=5), "documents start with BOS id 2, the model uses 5"),
           (cfg(eos_token_id=9), "documents end with EOS id 1, the model uses 9")]
    for model, message in bad:
        with pytest.raises(ValueError, match=message) as e:
            check_data_matches(d, model)
        assert "\n" not in str(e.value)
    # a model folder whose own tokenizer is another file
    other = gemma_folder(tmp_path / "other", sp_model, cfg())
    with open(other / "tokenizer.model", "ab") as f:
        f.write(b"\0")
    with pytest.raises(ValueError, match="a different file from .*other/tokenizer.model"):
        check_data_matches(d, str(other))
    with open(tmp_path / "ranks.model", "wb") as f:  # a valid tokenizer, just not the data's
        f.writelines(base64.b64encode(bytes([b])) + b" %d\n" % b for b in range(256))
    with pytest.raises(ValueError, match="a different file from .*ranks.model"):
        check_data_matches(d, cfg(), tokenizer=str(tmp_path / "ranks.model"))
    # ids beyond the model's vocabulary (shards not from this tokenizer)
    train = np.fromfile(os.path.join(d, "train.bin"), dtype=np.uint16)
    train[5] = 450
    train.tofile(os.path.join(d, "train.bin"))
    with pytest.raises(ValueError, match="train.bin holds token id 450, beyond the vocabulary of the model"):
        check_data_matches(d, cfg())


def test_redpajama_streams_and_mixes_files_through_hffilesystem(monkeypatch, sp_model, tmp_path):
    """The online hub path against local stand-ins for HfApi and HfFileSystem (no network here): the repo's listing
    is filtered by the pattern, files are opened as streams, interleaved by size, and reading stops once max_tokens
    is reached."""
    import types

    import huggingface_hub
    from huggingface_hub import constants
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    repo_dir = tmp_path / "datasets" / "togethercomputer" / "RedPajama-Data-1T-Sample"
    repo_dir.mkdir(parents=True)
    sources = {"arxiv": 300, "github": 600, "wikipedia": 300}
    for name, n in sources.items():
        with open(repo_dir / f"{name}_sample.jsonl", "w") as f:
            for i in range(n):
                f.write(json.dumps({"text": f"{name} document {i}: " + "lorem ipsum " * 20, "meta": {}}) + "\n")
    (repo_dir / "README.md").write_text("not data")
    opened = {}

    class LocalHubApi:
        def list_repo_tree(self, repo_id, path_in_repo=None, recursive=False, repo_type=None):
            assert repo_type == "dataset"
            return [types.SimpleNamespace(path=p.name, size=os.path.getsize(p)) for p in repo_dir.iterdir()]

    class LocalHubFS:
        def open(self, path, mode="rb", block_size=None):
            opened[path] = open(tmp_path / path, mode)
            return opened[path]

    monkeypatch.setattr(huggingface_hub, "HfApi", LocalHubApi)
    monkeypatch.setattr(huggingface_hub, "HfFileSystem", LocalHubFS)
    tok = load_tokenizer(str(sp_model / "gemma"))
    meta = prepare("redpajama", str(tmp_path / "ds"), tok, max_tokens=5000, val_tokens=500, verbose=False, layout="bos_chunks")
    assert meta["train_tokens"] == 5000 and meta["source"] == "redpajama"
    text = tok.decode([t for t in load_tokens(str(tmp_path / "ds"), "train").tolist()])
    counts = {name: text.count(f"{name} document") for name in sources}
    assert all(c > 0 for c in counts.values())  # a prefix already mixes every file
    assert counts["github"] > max(counts["arxiv"], counts["wikipedia"])  # in proportion to file size
    assert sum(counts.values()) < sum(sources.values()) / 2  # stopped early: most documents never read
    assert all(f.closed for f in opened.values())


def test_loader_ranks_together_take_the_single_process_batches(tmp_path):
    # DDP with per-rank batch B / W must see, step by step, the windows of one process with batch B
    d = arange_dataset(tmp_path, 9 * 64)
    single = TokenLoader(d, "train", 4, 10, seed=3)
    ranks = [TokenLoader(d, "train", 2, 10, rank=r, world_size=2, seed=3) for r in range(2)]
    for _ in range(10):  # past the end of an epoch, too
        expected = sorted(window_starts(single.next_batch()))
        assert sorted(s for r in ranks for s in window_starts(r.next_batch())) == expected
