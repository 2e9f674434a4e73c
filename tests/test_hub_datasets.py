"""Hub datasets offline and online: RedPajama from the cache, RedPajama-V2 sample-10B in the loading scripts' order,
streamed over HTTP, and their one-line errors (the fixtures and the fake hub: tests/test_hub.py)."""
import gzip
import io
import itertools
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from data import load_tokens, prepare
from formats.tokenizer import load_tokenizer
from formats import corpus
from tests.test_hub import ROOT, cache, fake_hub, online, put, sp_file, tiktoken_file  # noqa: F401  (fixtures)


# ----------------------------------------------------------------------------------------------------------------------
# Hub datasets


def test_redpajama_from_the_cache_offline(cache, sp_file, tmp_path):
    files = {}
    for name in ("arxiv", "github"):
        lines = [json.dumps({"text": f"{name} document {i}: " + "lorem ipsum " * 5}) for i in range(100)]
        files[f"{name}_sample.jsonl"] = ("\n".join(lines) + "\n").encode()
    files["README.md"] = b"not a jsonl"
    put(cache, "togethercomputer/RedPajama-Data-1T-Sample", files, repo_type="dataset")
    meta = prepare("redpajama", str(tmp_path / "ds"), load_tokenizer(sp_file), max_tokens=2000, val_tokens=200,
                   verbose=False, layout="bos_chunks")
    assert meta["train_tokens"] == 2000
    import shutil
    shutil.rmtree(cache / "datasets--togethercomputer--RedPajama-Data-1T-Sample")
    with pytest.raises(FileNotFoundError, match="dataset togethercomputer/RedPajama-Data-1T-Sample is not in the "
                                                "local hub cache"):
        prepare("redpajama", str(tmp_path / "p"), load_tokenizer(sp_file), max_tokens=100, layout="bos_chunks")


RPV2 = "togethercomputer/RedPajama-Data-V2"


def rpv2_text(tag, i):
    return f"{tag} doc {i}: \u00e9t\u00e9\nline two"


def rpv2_mirror(folder, missing=(), broken=(), docs_per_file=2):
    """The data.together.xyz layout: documents/<snapshot>/0000/<lang>_<part>.json.gz for every sample-10B file that
    `missing` does not name, each a gzip'd JSON line per document with the release's fields; `broken` files are
    not gzip. Returns the raw_content the loading script yields, in its order (its loops, written out here)."""
    expected = []
    for lang in ("en", "de", "fr", "es", "it"):
        for snap in corpus.RPV2_SNAPSHOTS:
            for part in ("head", "middle"):
                tag = f"{snap}/0000/{lang}_{part}"
                if tag in missing:
                    continue
                path = folder / "documents" / f"{tag}.json.gz"
                path.parent.mkdir(parents=True, exist_ok=True)
                if tag in broken:
                    path.write_bytes(b"not gzip")
                    continue
                rows = [{"url": f"https://x.org/{tag}/{i}", "date_download": "2014-04-16T12:00:00Z", "digest": "sha1:X",
                         "length": 40, "nlines": 1, "source_domain": "x.org", "title": "t", "language": lang,
                         "language_score": 0.9, "perplexity": 300.0, "bucket": part,
                         "raw_content": rpv2_text(tag, i)} for i in range(docs_per_file)]
                expected += [r["raw_content"] for r in rows]
                lines = [json.dumps(r) for r in rows]
                if tag == "2014-15/0000/en_head":  # rows the loading script skips: not JSON, a key missing
                    lines[1:1] = ["{not json", json.dumps({"raw_content": "no url"})]
                path.write_bytes(gzip.compress(("\n".join(lines) + "\n").encode()))
    return expected


def put_rpv2_missing(cache_root, tags):
    urls = "".join(f"{corpus.RPV2_URL}/documents/{t}.json.gz\n" for t in tags)
    put(cache_root, RPV2, {"urls/missing-documents.txt": urls.encode(), "urls/missing-signals.txt": b"",
                           "README.md": b"x"}, repo_type="dataset")


def serve(folder):
    """An http.server on a thread serving `folder`; returns (base URL, requested paths, server)."""
    import functools
    import http.server
    import threading
    requested = []

    class Handler(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):
            requested.append(self.path)

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Handler, directory=str(folder)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return f"http://127.0.0.1:{server.server_address[1]}", requested, server


def closed_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_redpajama_v2_sample_10b_in_the_loading_scripts_order(cache, tmp_path, monkeypatch):
    """Offline (the missing list from the cache), documents from a file:// mirror: every raw_content of the 840
    files in the script's order, missing files left out, bad rows and a non-gzip file skipped as it skips them."""
    missing, broken = {"2014-15/0000/en_middle", "2023-14/0000/de_head"}, {"2014-23/0000/fr_middle"}
    expected = rpv2_mirror(tmp_path / "mirror", missing, broken)
    put_rpv2_missing(cache, missing)
    monkeypatch.setenv("LORASAE_RPV2_URL", (tmp_path / "mirror").as_uri())
    docs = list(corpus.iter_documents("redpajama-v2"))
    assert docs == expected and len(docs) == 2 * (840 - 3)
    assert docs[:3] == [rpv2_text("2014-15/0000/en_head", 0), rpv2_text("2014-15/0000/en_head", 1),
                        rpv2_text("2014-23/0000/en_head", 0)]
    assert docs.index(rpv2_text("2023-14/0000/en_middle", 1)) == 2 * (168 - 1) - 1  # every English file first
    monkeypatch.setenv("LORASAE_RPV2_URL", str(tmp_path / "mirror"))  # a plain folder works too
    assert list(itertools.islice(corpus.iter_documents("redpajama-v2"), 3)) == docs[:3]


def test_redpajama_v2_streams_over_http_and_stops_early(cache, tmp_path, monkeypatch):
    """prepare from an http.server: gzip decompressed off the response, the first files only, the text exact."""
    expected = rpv2_mirror(tmp_path / "mirror", docs_per_file=50)
    put_rpv2_missing(cache, [])
    base, requested, server = serve(tmp_path / "mirror")
    monkeypatch.setenv("LORASAE_RPV2_URL", base + "/")
    try:
        tok = load_tokenizer(tiktoken_file(tmp_path / "bytes.model"))  # one token per byte: exact round trip
        meta = prepare("redpajama-v2", str(tmp_path / "ds"), tok, max_tokens=4000, val_tokens=500, verbose=False,
                       layout="bos_chunks")
    finally:
        server.shutdown()
        server.server_close()
    assert meta["train_tokens"] == 4000 and meta["source"] == "redpajama-v2"
    ids = np.concatenate([load_tokens(str(tmp_path / "ds"), s) for s in ("val", "train")]).tolist()
    texts = [t for t in tok.decode([i for i in ids if i < 256]).split("line two") if t]
    assert [t + "line two" for t in texts[:-1]] == expected[:len(texts) - 1]
    assert len(expected) == 42000 and len(texts) < 200  # a prefix: the stream stopped after a few files
    assert requested[0] == requested[1] == "/documents/2014-15/0000/en_head.json.gz" and len(requested) <= 6


def test_redpajama_v2_online_reads_the_missing_list_from_the_hub(online, tmp_path, monkeypatch):
    """Online: the urls/ folder is listed on the hub and the missing list streamed through HfFileSystem."""
    import huggingface_hub
    missing = "".join(f"{corpus.RPV2_URL}/documents/2014-15/0000/en_{p}.json.gz\n" for p in ("head", "middle"))
    fake_hub(monkeypatch, {RPV2: {"urls/missing-documents.txt": missing.encode(), "README.md": b""}}, online)
    opened = []

    class FakeFS:
        def open(self, path, mode="rb", block_size=None):
            opened.append(path)
            return io.BytesIO(missing.encode())

    monkeypatch.setattr(huggingface_hub, "HfFileSystem", FakeFS)
    expected = rpv2_mirror(tmp_path / "mirror", docs_per_file=1)
    monkeypatch.setenv("LORASAE_RPV2_URL", str(tmp_path / "mirror"))
    assert list(itertools.islice(corpus.iter_documents("redpajama-v2"), 2)) == expected[2:4]  # 2014-23 first
    assert opened == [f"datasets/{RPV2}/urls/missing-documents.txt"] and monkeypatch.fetched == []


def test_redpajama_v2_errors_are_one_line(cache, tmp_path, monkeypatch):
    monkeypatch.setenv("LORASAE_RPV2_URL", str(tmp_path / "mirror"))
    with pytest.raises(FileNotFoundError, match=f"dataset {RPV2} is not in the local hub cache"):
        corpus.iter_documents("redpajama-v2")
    put_rpv2_missing(cache, [])
    with pytest.raises(FileNotFoundError, match=r"no such file file://.*/documents/2014-15/0000/en_head.json.gz; "
                                                r"check LORASAE_RPV2_URL"):
        corpus.iter_documents("redpajama-v2")
    monkeypatch.setenv("LORASAE_RPV2_URL", f"http://127.0.0.1:{closed_port()}")
    with pytest.raises(ConnectionError, match=r"cannot reach http://127.0.0.1:\d+/documents/2014-15/0000/en_head"
                                              r".json.gz \(.*refused.*\); check LORASAE_RPV2_URL") as e:
        corpus.iter_documents("redpajama-v2")
    assert "\n" not in str(e.value)
    monkeypatch.delenv("LORASAE_RPV2_URL")  # the real server, unreachable here: what to do is said
    monkeypatch.setattr(corpus.urllib.request, "urlopen", lambda url, timeout: (_ for _ in ()).throw(
        corpus.urllib.error.URLError(OSError("Name or service not known"))))
    with pytest.raises(ConnectionError, match=r"cannot reach https://data.together.xyz/redpajama-data-v2/v1.0.0/"
                                              r"documents/2014-15/0000/en_head.json.gz \(Name or service not known\);"
                                              r" the documents are served by data.together.xyz, not the hub: .*"
                                              r"LORASAE_RPV2_URL.*HF_HUB_OFFLINE=1 covers only the hub's files"):
        corpus.iter_documents("redpajama-v2")


def test_prepare_cli_redpajama_v2_offline_and_unreachable(tmp_path):
    """python data.py as a user types it: from a mirror with HF_HUB_OFFLINE=1, then an unreachable server: exit 2,
    one line."""
    root = tmp_path / "hf" / "hub"
    root.mkdir(parents=True)
    put_rpv2_missing(root, [])
    expected = rpv2_mirror(tmp_path / "mirror", docs_per_file=20)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(root), "OMP_NUM_THREADS": "1",
           "LORASAE_RPV2_URL": str(tmp_path / "mirror")}
    args = [sys.executable, "data.py", "--source", "redpajama-v2", "--tokenizer", tiktoken_file(tmp_path / "b.model"),
            "--max-tokens", "1000", "--val-tokens", "100", "--seq-len", "64"]
    proc = subprocess.run(args + ["--out", str(tmp_path / "ok")], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    meta = json.load(open(tmp_path / "ok" / "meta.json"))
    assert (meta["source"], meta["layout"], meta["train_tokens"]) == ("redpajama-v2", "authors", 1024)
    assert expected[0].encode() in np.fromfile(tmp_path / "ok" / "val.bin", dtype=np.uint16).astype(np.uint8).tobytes()
    env["LORASAE_RPV2_URL"] = f"http://127.0.0.1:{closed_port()}"
    proc = subprocess.run(args + ["--out", str(tmp_path / "ds")], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert proc.stderr.startswith("data.py: error: redpajama-v2: cannot reach http://127.0.0.1:")
    assert "LORASAE_RPV2_URL" in proc.stderr and not os.path.exists(tmp_path / "ds")
