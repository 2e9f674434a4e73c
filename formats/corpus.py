"""
Corpora: where documents come from. Each source is a stream of strings that data.prepare tokenizes.

    stdlib        the Python standard library's own sources (offline, identical for the same Python)
    a path        a .txt / .md / .py file or a .jsonl of {"text": ...} lines, or a folder of them
    pile          monology/pile-uncopyrighted, streamed from the hub (needs zstandard)
    redpajama     togethercomputer/RedPajama-Data-1T-Sample, streamed from the hub, its sources interleaved
    redpajama-v2  togethercomputer/RedPajama-Data-V2, config sample-10B, field raw_content: the paper's training data

redpajama-v2 is what the hub's loading script RedPajama-Data-V2.py (_split_generators_full, _generate_examples,
handle_record) yields for sample-10B. No listing file names its files: they are shard 0000 of each head and middle
file, `for lang in en de fr es it: for snapshot in _CC_SNAPSHOT_IDS (84, 2014-15 .. 2023-14): for part in head
middle`, 840 files documents/<snapshot>/0000/<lang>_<part>.json.gz under https://data.together.xyz/redpajama-data-v2/
v1.0.0 (not on the hub), less those whose URL the hub repo's urls/missing-documents.txt lists. A file is gzip'd JSON
lines with url, language, source_domain, date_download, digest, raw_content; rows come in file order, a row that is not
JSON or lacks one of those keys is skipped, and so is the rest of a file that is not gzip. (The script zips each
file's rows with its quality-signals file; one signals row per document is assumed, so those are not read.) That is
the order of load_dataset(..., "sample-10B", streaming=True) and of the downloaded table's rows. The authors download
the table and call dataset.shuffle(seed=42) (their train_sae.py:35-42, utils.py:203-210): a permutation of every
document, which needs the whole download and is not reproduced here; a prefix of this stream is English 2014-15.
LORASAE_RPV2_URL replaces the documents' base URL with a mirror (a folder, file:// or http://); the missing list
comes from the hub, or its cache with HF_HUB_OFFLINE=1.
"""
from __future__ import annotations

import fnmatch
import gzip
import http.client
import io
import json
import os
import pathlib
import sys
import sysconfig
import urllib.error
import urllib.request

import numpy as np

from plumbing import common
from formats import hub

TEXT_EXTS = (".txt", ".md", ".py")  # read whole, one document per file; .jsonl: one {"text": ...} per line
HUB_DATASETS = {  # name: (repo, file glob). The Pile is shuffled already; RedPajama's sample is one file per source
    "pile": ("monology/pile-uncopyrighted", "train/*.jsonl.zst"),
    "redpajama": ("togethercomputer/RedPajama-Data-1T-Sample", "*.jsonl"),
    "redpajama-v2": ("togethercomputer/RedPajama-Data-V2", "urls/missing-documents.txt"),  # documents: RPV2_URL
}
RPV2_URL = "https://data.together.xyz/redpajama-data-v2/v1.0.0"  # the loading script's _URL_BASE
RPV2_URL_ENV = "LORASAE_RPV2_URL"
RPV2_LANGUAGES = ("en", "de", "fr", "es", "it")
RPV2_SNAPSHOTS = tuple((  # the loading script's _CC_SNAPSHOT_IDS, in its order
    "2014-15 2014-23 2014-35 2014-41 2014-42 2014-49 2014-52 2015-14 2015-22 2015-27 2015-32 2015-35 2015-40 2015-48 "
    "2016-07 2016-18 2016-22 2016-26 2016-30 2016-36 2016-40 2016-44 2016-50 2017-04 2017-09 2017-17 2017-22 2017-26 "
    "2017-30 2017-34 2017-39 2017-43 2017-47 2017-51 2018-05 2018-09 2018-13 2018-17 2018-22 2018-26 2018-30 2018-34 "
    "2018-39 2018-43 2018-47 2018-51 2019-04 2019-09 2019-13 2019-18 2019-22 2019-26 2019-30 2019-35 2019-39 2019-43 "
    "2019-47 2019-51 2020-05 2020-10 2020-16 2020-24 2020-29 2020-34 2020-40 2020-45 2020-50 2021-04 2021-10 2021-17 "
    "2021-21 2021-25 2021-31 2021-39 2021-43 2021-49 2022-05 2022-21 2022-27 2022-33 2022-40 2022-49 2023-06 2023-14"
).split())
RPV2_KEYS = ("url", "language", "source_domain", "date_download", "digest", "raw_content")  # handle_record reads all


def stdlib_files() -> list[str]:
    """The standard library's .py sources, sorted by their path inside it. Test suites (test/, tests/, idle_test/)
    are left out: the ordinary library code alone is more than a CPU pretraining run reads, and the
    tests hold generated data and deliberately odd encodings. site-packages (whatever the user installed) too."""
    root = sysconfig.get_paths()["stdlib"]
    skip = {"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__"}
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in skip]
        found += [os.path.join(dirpath, f) for f in filenames if f.endswith(".py")]
    return sorted(found, key=lambda p: os.path.relpath(p, root))


def read_text(path: str) -> str | None:
    """A file's text, or None if it is not UTF-8 (a handful of stdlib files carry latin-1 on purpose)."""
    try:
        with open(path, encoding="utf-8", newline="") as f:
            return f.read()
    except UnicodeDecodeError:
        return None


def read_local_text(path: str) -> tuple[str, bool]:
    """A user's text file, and whether it needed the stated rule for text that is not UTF-8: bytes that do not decode
    are replaced by U+FFFD (the rest of the file is kept: never dropped)."""
    with open(path, "rb") as f:
        raw = f.read()
    try:
        return raw.decode("utf-8"), False
    except UnicodeDecodeError:
        return raw.decode("utf-8", errors="replace"), True


def jsonl_texts(lines, where: str):
    """The 'text' of each JSON line (or the line's JSON string); one ValueError naming file:line for a bad one."""
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError:
            raise ValueError(f"{where}:{n}: not valid JSON") from None
        text = obj if isinstance(obj, str) else obj.get("text") if isinstance(obj, dict) else None
        if not isinstance(text, str):
            raise ValueError(f"{where}:{n}: expected a JSON object with a 'text' string (or a JSON string)")
        yield text


def _local_documents(path: str) -> list[str]:
    if os.path.isdir(path):
        files = sorted(os.path.join(d, f) for d, _, fs in os.walk(path) for f in fs
                       if f.endswith(TEXT_EXTS + (".jsonl",)))
        if not files:
            raise ValueError(f"empty corpus: no {'/'.join(TEXT_EXTS + ('.jsonl',))} files under {path}")
    elif path.endswith(TEXT_EXTS + (".jsonl",)):
        files = [path]
    else:
        raise ValueError(f"{path}: unsupported file type (expected {', '.join(TEXT_EXTS + ('.jsonl',))} or a folder)")
    docs, replaced = [], []
    for f in files:
        text, bad = read_local_text(f)
        if bad:
            replaced.append(f)
        if f.endswith(".jsonl"):
            docs += list(jsonl_texts(text.splitlines(), f))
        else:
            docs.append(text)
    if replaced:
        names = ", ".join(os.path.relpath(f, path) if os.path.isdir(path) else f for f in replaced[:3])
        common.log(f"{path}: {len(replaced)} of {len(files)} files are not valid UTF-8 ({names}"
                   f"{', ...' if len(replaced) > 3 else ''}): read with the bytes that do not decode replaced by "
                   f"U+FFFD")
    return [d for d in docs if d and d.strip()]


def _hub_documents(name: str, seed: int):
    """List a hub dataset's files now (on the hub, or in the cache offline) and return a stream of its documents. Hub
    files are read as byte-range streams, so only as much of each is downloaded as the requested token count needs."""
    repo, pattern = HUB_DATASETS[name]
    listing = hub.list_files(repo, repo_type="dataset")
    files = sorted(f for f in listing.files if fnmatch.fnmatch(f, pattern))
    if not files:
        raise FileNotFoundError(f"hub dataset {repo}: no files match {pattern} {listing.where}")
    return _hub_stream(name, listing, files, seed)


def _hub_stream(name, listing, files, seed):
    if name == "pile":  # one file after another; zstd-compressed JSON lines
        import zstandard
        for f in files:
            with hub.open_file(listing, f) as raw:
                reader = zstandard.ZstdDecompressor().stream_reader(raw)
                yield from jsonl_texts(io.TextIOWrapper(reader, encoding="utf-8"), f)
        return
    # RedPajama's sample keeps each source (arxiv, c4, github, ...) in its own file: interleave them, drawing the
    # next document from a file with probability proportional to its size, so any prefix has the sample's mixture
    sizes = np.array([listing.files[f] for f in files], dtype=np.float64)
    handles = [io.TextIOWrapper(hub.open_file(listing, f), encoding="utf-8") for f in files]
    streams = [jsonl_texts(h, f) for h, f in zip(handles, files)]
    rng = np.random.default_rng(seed)
    try:
        while sizes.sum() > 0:
            i = rng.choice(len(files), p=sizes / sizes.sum())
            try:
                yield next(streams[i])
            except StopIteration:
                sizes[i] = 0
    finally:
        for h in handles:
            h.close()


# ----------------------------------------------------------------------------------------------------------------------
# RedPajama-V2 sample-10B: the file list from the loading script's loops, the documents over HTTP


def rpv2_tags() -> list[str]:
    """sample-10B's 840 base tags in the loading script's order (_SUBSAMPLE_FILE_COUNTS["sample-10B"] = 1 shard)."""
    return [f"{snap}/0000/{lang}_{part}" for lang in RPV2_LANGUAGES for snap in RPV2_SNAPSHOTS
            for part in ("head", "middle")]


def rpv2_base_url() -> str:
    base = os.environ.get(RPV2_URL_ENV) or RPV2_URL
    if "://" not in base:  # a local folder holding documents/...
        base = pathlib.Path(os.path.abspath(base)).as_uri()
    return base.rstrip("/")


def _rpv2_hint(url: str) -> str:
    if not url.startswith(RPV2_URL):
        return f"check {RPV2_URL_ENV} ({os.environ.get(RPV2_URL_ENV)})"
    offline = "; HF_HUB_OFFLINE=1 covers only the hub's files" if hub.offline() else ""
    return (f"the documents are served by {RPV2_URL.split('/')[2]}, not the hub: connect to it, or set {RPV2_URL_ENV} "
            f"to a mirror (a folder or URL holding documents/<snapshot>/0000/<lang>_<part>.json.gz){offline}")


def _rpv2_open(url: str):
    """The response for url (HTTP or file://), or one line: FileNotFoundError for a file the server lacks,
    ConnectionError for a server that cannot be reached, ValueError for a URL urllib cannot read."""
    try:
        return urllib.request.urlopen(url, timeout=60)
    except urllib.error.HTTPError as e:
        if e.code == 404:
            raise FileNotFoundError(f"redpajama-v2: {url}: not found (HTTP 404); {_rpv2_hint(url)}") from None
        raise ConnectionError(f"redpajama-v2: {url}: HTTP {e.code} {e.reason}; {_rpv2_hint(url)}") from None
    except urllib.error.URLError as e:
        if isinstance(e.reason, FileNotFoundError) or url.startswith("file:"):
            raise FileNotFoundError(f"redpajama-v2: no such file {url}; {_rpv2_hint(url)}") from None
        if str(e.reason).startswith("unknown url type"):
            raise ValueError(f"redpajama-v2: {url}: {e.reason}; {_rpv2_hint(url)}") from None
        raise ConnectionError(f"redpajama-v2: cannot reach {url} ({e.reason}); {_rpv2_hint(url)}") from None
    except (OSError, http.client.HTTPException) as e:  # a timeout, a reset connection
        raise ConnectionError(f"redpajama-v2: {url}: {type(e).__name__}: {e}; {_rpv2_hint(url)}") from None


def _rpv2_documents():
    """Resolve the file list now (the missing list from the hub or its cache, the first file opened once, so that
    errors come before any work) and return the stream of raw_content strings."""
    repo, listed = HUB_DATASETS["redpajama-v2"]
    folder, name = listed.rsplit("/", 1)
    listing = hub.list_files(repo, folder, repo_type="dataset")
    if name not in listing.files:
        raise FileNotFoundError(f"hub dataset {repo}: no {listed} {listing.where}")
    with io.TextIOWrapper(hub.open_file(listing, name), encoding="utf-8") as f:
        missing = {line.strip() for line in f}  # the canonical URLs, whatever mirror serves the files
    tags = [t for t in rpv2_tags() if f"{RPV2_URL}/documents/{t}.json.gz" not in missing]
    if not tags:
        raise ValueError(f"redpajama-v2: {listed} {listing.where} names every sample-10B file as missing")
    base = rpv2_base_url()
    _rpv2_open(f"{base}/documents/{tags[0]}.json.gz").close()
    return _rpv2_stream(base, tags)


def _rpv2_stream(base: str, tags: list[str]):
    for tag in tags:
        url = f"{base}/documents/{tag}.json.gz"
        # gzip over the response: a file is decompressed as it arrives and never held whole
        with _rpv2_open(url) as resp, io.TextIOWrapper(gzip.GzipFile(fileobj=resp), encoding="utf-8") as lines:
            try:
                for row, line in enumerate(lines):
                    try:
                        doc = json.loads(line)
                    except ValueError:
                        doc = None
                    if isinstance(doc, dict) and all(k in doc for k in RPV2_KEYS) \
                            and isinstance(doc["raw_content"], str):
                        yield doc["raw_content"]
                    else:  # the loading script logs the row and goes on
                        print(f"redpajama-v2: skipped row {row} of {tag}: not a document record", file=sys.stderr)
            except gzip.BadGzipFile as e:  # the loading script skips the rest of a broken file
                print(f"redpajama-v2: skipped the rest of {tag}: {e}", file=sys.stderr)
            except UnicodeDecodeError as e:
                raise ValueError(f"redpajama-v2: {url} is not UTF-8 ({e})") from None
            except (EOFError, OSError, http.client.HTTPException) as e:  # the loading script stops here too
                if url.startswith("file:"):
                    raise ValueError(f"redpajama-v2: {url} is truncated or corrupt ({e}): fetch it again") from None
                raise ConnectionError(f"redpajama-v2: reading {url} stopped ({type(e).__name__}: {e}); run again, "
                                      f"or use a local mirror ({RPV2_URL_ENV})") from None


def iter_documents(source: str, seed: int = 0):
    """Validate `source` now (errors before any work) and return an iterator over its documents. Local sources and
    the stdlib are shuffled by document with `seed`; hub streams keep their order (the Pile is shuffled already)."""
    if source == "redpajama-v2":
        return _rpv2_documents()
    if source in HUB_DATASETS:
        if source == "pile":
            try:
                import zstandard  # noqa: F401
            except ImportError:
                raise ModuleNotFoundError("reading The Pile (.jsonl.zst) needs the optional package zstandard: "
                                          "pip install zstandard") from None
        return _hub_documents(source, seed)
    if source == "stdlib":
        files = stdlib_files()
        if not files:
            raise ValueError(f"empty corpus: no .py files under {sysconfig.get_paths()['stdlib']}")
        order = np.random.default_rng(seed).permutation(len(files))
        return (t for t in (read_text(files[i]) for i in order) if t and t.strip())
    if os.path.exists(source):
        docs = _local_documents(source)
        if not docs:
            raise ValueError(f"empty corpus: {source} holds no text")
        return (docs[i] for i in np.random.default_rng(seed).permutation(len(docs)))
    raise ValueError(f"unknown source {source!r}: expected 'stdlib', 'pile', 'redpajama', 'redpajama-v2', or an "
                     f"existing .txt/.jsonl file or folder")


def split_documents(data_dir: str, use: str, train: bool = False) -> tuple[list[str], list[str]]:
    """(held-out, training) documents of a token folder that data.prepare wrote with layout "bos_chunks" from the
    stdlib or a local path, read again from that source in the order prepare wrote them: the first meta["val_docs"]
    documents are val.bin's (whole), the next meta["train_docs"] train.bin's (the training list only if `train`; its
    last document may be cut in train.bin). `use` names the caller in errors."""
    path = os.path.join(data_dir, "meta.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{data_dir}: no meta.json (not a token folder written by data.prepare)")
    with open(path) as f:
        meta = json.load(f)
    if meta.get("layout") != "bos_chunks" or "val_docs" not in meta:
        raise ValueError(f"{data_dir}: {use} needs a folder prepared with layout bos_chunks (whole documents in "
                         f"val.bin), e.g. the embedded corpus")
    if meta.get("source") != "stdlib" and not os.path.exists(str(meta.get("source"))):
        raise ValueError(f"{data_dir}: its documents came from {meta.get('source')!r}, not a local source: {use} "
                         f"cannot read them again")
    docs = iter_documents(meta["source"], meta["seed"])
    held_out = [next(docs) for _ in range(meta["val_docs"])]
    return held_out, ([next(docs) for _ in range(meta.get("train_docs", 0))] if train else [])
