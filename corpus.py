"""
Corpora: where documents come from. Each source is a stream of strings that data.prepare tokenizes.

    stdlib      the Python standard library's own sources (offline, identical for the same Python)
    a path      a .txt / .md / .py file or a .jsonl of {"text": ...} lines, or a folder of them
    pile        monology/pile-uncopyrighted, streamed from the hub (needs zstandard)
    redpajama   togethercomputer/RedPajama-Data-1T-Sample, streamed from the hub, its sources interleaved
"""
from __future__ import annotations

import fnmatch
import io
import json
import os
import sysconfig

import numpy as np

import hub

TEXT_EXTS = (".txt", ".md", ".py")  # read whole, one document per file; .jsonl: one {"text": ...} per line
HUB_DATASETS = {  # name: (repo, file glob). The Pile is shuffled already; RedPajama's sample is one file per source
    "pile": ("monology/pile-uncopyrighted", "train/*.jsonl.zst"),
    "redpajama": ("togethercomputer/RedPajama-Data-1T-Sample", "*.jsonl"),
}


def stdlib_files() -> list[str]:
    """The standard library's .py sources, sorted by their path inside it. Test suites (test/, tests/, idle_test/)
    are left out: 12 MB (3.4M tokens) of ordinary library code is more than a CPU pretraining run reads, and the
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
    docs = []
    for f in files:
        if f.endswith(".jsonl"):
            with open(f, encoding="utf-8") as fh:
                docs += list(jsonl_texts(fh, f))
        else:
            docs.append(read_text(f))
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


def iter_documents(source: str, seed: int = 0):
    """Validate `source` now (errors before any work) and return an iterator over its documents. Local sources and
    the stdlib are shuffled by document with `seed`; hub streams keep their order (the Pile is shuffled already)."""
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
    raise ValueError(f"unknown source {source!r}: expected 'stdlib', 'pile', 'redpajama', or an existing "
                     f".txt/.jsonl file or folder")
