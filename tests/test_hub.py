"""hub.py and its users offline: a Hugging Face cache laid out as huggingface_hub writes it, with HF_HUB_OFFLINE=1.

Each model family, each tokenizer layout, each SAE format at a sub-path, the hub datasets, and the one-line errors;
the hub itself (unreachable here) is replaced by fakes of HfApi.list_repo_tree and hf_hub_download where online
behaviour is tested, and RedPajama-V2's document server by a local folder or an http.server on a thread."""
import base64
import gzip
import hashlib
import io
import itertools
import json
import os
import subprocess
import sys
import types

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from formats import corpus
from formats import hub
from data import load_tokenizer, load_tokens, prepare
from formats.stdlib_corpus import train_tokenizer
from model import ModelConfig, Transformer
from sae import SAE

REV = "0123456789abcdef0123456789abcdef01234567"
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """An empty hub cache, offline (huggingface_hub.constants read at import: patched there, as hub.py reads them)."""
    from huggingface_hub import constants
    root = tmp_path / "hf" / "hub"
    root.mkdir(parents=True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(root))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return root


def put(cache_root, repo_id, files: dict, repo_type="model", rev=REV):
    """Write files into the cache as hf_hub_download does: content in blobs/<hash>, snapshots/<rev>/<path> a relative
    symlink to it, refs/main holding the revision. Values: bytes, or a local file to copy."""
    repo = cache_root / f"{repo_type}s--{repo_id.replace('/', '--')}"
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / "main").write_text(rev)
    for rel, content in files.items():
        data = content if isinstance(content, bytes) else open(content, "rb").read()
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(data)
        link = repo / "snapshots" / rev / rel
        link.parent.mkdir(parents=True, exist_ok=True)
        if link.exists() or link.is_symlink():
            link.unlink()
        link.symlink_to(os.path.relpath(blob, link.parent))
    return repo / "snapshots" / rev


def folder_files(folder):
    return {os.path.relpath(os.path.join(d, f), folder): os.path.join(d, f)
            for d, _, fs in os.walk(folder) for f in fs}


def tiktoken_file(path):
    """A Llama-3 style rank file: the 256 single bytes (plus Llama-3's 256 specials = the tiny models' 512 tokens)."""
    with open(path, "wb") as f:
        for b in range(256):
            f.write(base64.b64encode(bytes([b])) + b" %d\n" % b)
    return str(path)


@pytest.fixture(scope="module")
def sp_file(tmp_path_factory):
    """A Gemma-layout sentencepiece model (pad 0, eos 1, bos 2) of 512 pieces, the tiny Gemma's vocabulary."""
    folder = tmp_path_factory.mktemp("sp")
    src = [os.path.join(os.path.dirname(os.__file__), n) for n in ("textwrap.py", "argparse.py", "bisect.py")]
    return train_tokenizer(src, str(folder / "tokenizer.model"), vocab_size=512).path


def tiny_model_repo(tmp_path, family, sp_file):
    cfg = ModelConfig.from_name(f"tiny-{family}")
    if family == "llama3":  # Llama-3's specials follow the base ranks: 256 single bytes -> bos 256, eos 257
        cfg.bos_token_id, cfg.eos_token_id = 256, 257
    folder = tmp_path / f"src-{family}"
    Transformer(cfg).init_weights(0).save_pretrained(str(folder))
    files = folder_files(folder)
    if family.startswith("gemma"):
        files["tokenizer.model"] = sp_file
    else:  # Llama-3: the tiktoken file under original/, a (here: dummy) tokenizer.json at the top
        files["original/tokenizer.model"] = tiktoken_file(tmp_path / "ranks.model")
        files["tokenizer.json"] = b"{}"
    files["original/consolidated.00.pth"] = b"not downloaded by us"
    return folder, files


# ----------------------------------------------------------------------------------------------------------------------
# The cache layout is the hub's own


def test_cache_layout_is_what_huggingface_hub_reads(cache):
    from huggingface_hub import snapshot_download, try_to_load_from_cache
    snap = put(cache, "org/repo", {"config.json": b"{}", "sub/params.npz": b"x"})
    assert try_to_load_from_cache("org/repo", "sub/params.npz", cache_dir=str(cache)) == str(snap / "sub/params.npz")
    assert snapshot_download("org/repo", cache_dir=str(cache), local_files_only=True) == str(snap)
    listing = hub.list_files("org/repo", "sub")
    assert listing.files == {"params.npz": 1} and listing.snapshot == str(snap) and "HF_HUB_OFFLINE" in listing.where


# ----------------------------------------------------------------------------------------------------------------------
# Models and tokenizers


@pytest.mark.parametrize("family", ["gemma2", "llama3"])
def test_model_and_tokenizer_from_the_cache_offline(cache, tmp_path, family, sp_file):
    folder, files = tiny_model_repo(tmp_path, family, sp_file)
    repo = {"gemma2": "google/tiny-gemma-2", "llama3": "meta-llama/Tiny-Llama-3.2"}[family]
    put(cache, repo, files)
    ours = Transformer.from_pretrained(repo)
    ref = Transformer.from_pretrained(str(folder))
    for (n, p), (m, q) in zip(ours.state_dict().items(), ref.state_dict().items()):
        assert n == m and torch.equal(p, q)
    tok = load_tokenizer(repo)  # Llama-3: original/tokenizer.model, found from the listing without a failed try first
    assert tok.kind == ("sentencepiece" if family == "gemma2" else "tiktoken")
    assert (tok.vocab_size, tok.bos_id, tok.eos_id) == (512, ours.cfg.bos_token_id, ours.cfg.eos_token_id)


def test_hub_model_online_downloads_only_what_it_needs(cache, tmp_path, monkeypatch, sp_file):
    """Online: the repo's listing decides, and only config, weights and tokenizer files are fetched."""
    from huggingface_hub import constants
    _, files = tiny_model_repo(tmp_path, "llama3", sp_file)
    fake_hub(monkeypatch, {"meta-llama/Tiny": files}, cache)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    Transformer.from_pretrained("meta-llama/Tiny")
    load_tokenizer("meta-llama/Tiny")
    fetched = {f for _, f in monkeypatch.fetched}
    assert fetched == {"config.json", "model.safetensors", "original/tokenizer.model", "tokenizer.json"}


def test_offline_env_var_in_a_fresh_process(tmp_path, sp_file):
    """HF_HUB_OFFLINE / HF_HUB_CACHE as a user sets them: read by huggingface_hub at import."""
    root = tmp_path / "hf" / "hub"
    _, files = tiny_model_repo(tmp_path, "llama3", sp_file)
    put(root, "meta-llama/Tiny", files)
    code = ("import data, model; from formats import sae_files\n"
            "print(data.load_tokenizer('meta-llama/Tiny').kind, model.Transformer.from_pretrained('meta-llama/Tiny')"
            ".cfg.n_layer)\n"
            "try:\n    data.load_tokenizer('meta-llama/Not-Cached')\nexcept FileNotFoundError as e:\n    print(e)\n")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(root), "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.strip().splitlines()
    assert lines[0] == "tiktoken 4"
    assert lines[1].startswith("meta-llama/Not-Cached is not in the local hub cache") and "HF_HUB_OFFLINE" in lines[1]


# ----------------------------------------------------------------------------------------------------------------------
# SAEs: every format at a sub-path


def write_sae_formats(tmp_path, d=16, m=32):
    """One SAE per format in the layout its release uses; returns {hub path: (files, expected layer, arch)}."""
    g = torch.Generator().manual_seed(0)
    r = lambda *s: torch.randn(*s, generator=g) * 0.3  # noqa: E731
    src = tmp_path / "sae-src"
    src.mkdir()
    np.savez(src / "params.npz", W_enc=r(d, m).numpy(), W_dec=r(m, d).numpy(), b_enc=r(m).numpy(),
             b_dec=r(d).numpy(), threshold=r(m).abs().numpy())
    save_file({"W_enc": r(d, m), "W_dec": r(m, d), "b_enc": r(m), "b_dec": r(d)}, str(src / "sae_weights.safetensors"))
    (src / "saelens.json").write_text(json.dumps({"architecture": "topk", "d_in": d, "d_sae": m, "k": 4}))
    save_file({"encoder.weight": r(m, d), "encoder.bias": r(m), "W_dec": r(m, d), "b_dec": r(d)},
              str(src / "sae.safetensors"))
    (src / "sparsify.json").write_text(json.dumps({"k": 4, "num_latents": m, "d_in": d}))
    save_file({"encoder.weight": r(m, d), "encoder.bias": r(m), "decoder.weight": r(d, m), "decoder.bias": r(d)},
              str(src / "final.safetensors"))
    (src / "hyperparams.json").write_text(json.dumps({"act_fn": "jumprelu", "jump_relu_threshold": 0.1,
                                                      "norm_activation": "inference", "d_model": d, "d_sae": m}))
    return {
        "google/gemma-scope-2b-pt-res/layer_12/width_16k/average_l0_82":
            ({"params.npz": src / "params.npz"}, 12, "jumprelu"),
        "jbloom/some-saes/blocks.12.hook_resid_post":
            ({"cfg.json": src / "saelens.json", "sae_weights.safetensors": src / "sae_weights.safetensors"},
             12, "topk"),
        "paper/sae-gemma-2-2b/model.layers.12":  # the paper's own SAEs: sparsify, saved per hook
            ({"cfg.json": src / "sparsify.json", "sae.safetensors": src / "sae.safetensors"}, 12, "topk"),
        "fnlp/Llama-Scope/L12R":
            ({"hyperparams.json": src / "hyperparams.json",
              "checkpoints/final.safetensors": src / "final.safetensors"}, 12, "jumprelu"),
    }


def test_every_sae_format_at_a_sub_path_offline(cache, tmp_path):
    saes = write_sae_formats(tmp_path)
    for path, (files, _, _) in saes.items():
        repo_id, sub = hub.split(path)
        put(cache, repo_id, {f"{sub}/{k}": v for k, v in files.items()})
        # a neighbour of another format, so that the listing, not the repo, decides
        put(cache, repo_id, {"other/cfg.json": b"{}", "other/sae.safetensors": b"x"})
    for path, (_, layer, arch) in saes.items():
        sae = SAE.from_pretrained(path)  # no --layer: the folder's name gives it
        assert (sae.layer, sae.arch) == (layer, arch), path
        assert sae(torch.randn(3, 16)).shape == (3, 16)
    assert SAE.from_pretrained(next(iter(saes))).model_name == "google/gemma-2-2b"


def test_sae_hub_errors_are_one_line(cache, tmp_path, monkeypatch):
    put(cache, "org/saes", {"layer_3/cfg.json": b"{}"})  # the weights were never downloaded
    with pytest.raises(ValueError, match="unknown SAE format.*only files already downloaded are visible") as e:
        SAE.from_pretrained("org/saes/layer_3")
    assert "\n" not in str(e.value)
    with pytest.raises(FileNotFoundError, match="no folder 'layer_4'.*cached: layer_3/") as e:
        SAE.from_pretrained("org/saes/layer_4")
    with pytest.raises(FileNotFoundError, match=r"org/missing is not in the local hub cache .*HF_HUB_OFFLINE=1.*"
                                                r"hf auth login.*HF_HUB_CACHE") as e:
        SAE.from_pretrained("org/missing/layer_3")
    assert "\n" not in str(e.value)
    with pytest.raises(FileNotFoundError, match="no such file or folder"):
        SAE.from_pretrained("./org/saes")
    monkeypatch.chdir(tmp_path)
    (tmp_path / "out").mkdir()
    with pytest.raises(FileNotFoundError, match="out/sae: no such local file or folder; as a hub path: out/sae is not"):
        SAE.from_pretrained("out/sae")


# ----------------------------------------------------------------------------------------------------------------------
# Online behaviour against a fake hub


class FakeFile(types.SimpleNamespace):
    pass


def fake_hub(monkeypatch, repos: dict, cache_root, error=None):
    """HfApi().list_repo_tree and hf_hub_download over `repos` ({repo_id: {path: bytes | local file}}); downloads
    land in the cache like the real ones. monkeypatch.fetched records (repo, path) of every download."""
    import huggingface_hub
    monkeypatch.fetched = []

    class FakeApi:
        def list_repo_tree(self, repo_id, path_in_repo=None, recursive=False, repo_type=None):
            if error is not None:
                raise error
            if repo_id not in repos:
                from huggingface_hub.utils import RepositoryNotFoundError
                raise RepositoryNotFoundError("404", response=types.SimpleNamespace(headers={}, request=None))
            prefix = path_in_repo + "/" if path_in_repo else ""
            return [FakeFile(path=p, size=1) for p in repos[repo_id] if p.startswith(prefix)]

    def download(repo_id, filename, *, subfolder=None, repo_type=None, cache_dir=None):
        rel = f"{subfolder}/{filename}" if subfolder else filename
        monkeypatch.fetched.append((repo_id, rel))
        return str(put(cache_root, repo_id, {rel: repos[repo_id][rel]}) / rel)

    monkeypatch.setattr(huggingface_hub, "HfApi", FakeApi)
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", download)


@pytest.fixture
def online(cache, monkeypatch):
    from huggingface_hub import constants
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    return cache


def test_online_sae_listing_picks_the_format_and_downloads_only_it(online, tmp_path, monkeypatch):
    saes = write_sae_formats(tmp_path)
    repos = {}
    for path, (files, _, _) in saes.items():
        repo_id, sub = hub.split(path)
        repos.setdefault(repo_id, {}).update({f"{sub}/{k}": v for k, v in files.items()})
        repos[repo_id].update({"README.md": b"", "other/params.npz": b"x"})
    fake_hub(monkeypatch, repos, online)
    for path, (files, layer, _) in saes.items():
        monkeypatch.fetched.clear()
        assert SAE.from_pretrained(path).layer == layer
        repo_id, sub = hub.split(path)
        assert sorted(monkeypatch.fetched) == sorted((repo_id, f"{sub}/{k}") for k in files)


def test_online_errors_gated_missing_unreachable(online, monkeypatch):
    from huggingface_hub.utils import GatedRepoError
    response = types.SimpleNamespace(headers={}, request=None, status_code=403)
    fake_hub(monkeypatch, {}, online, error=GatedRepoError("403 gated", response=response))
    with pytest.raises(PermissionError, match="google/gemma-2-2b is a gated repo.*hf auth login") as e:
        Transformer.from_pretrained("google/gemma-2-2b")
    assert "\n" not in str(e.value)
    fake_hub(monkeypatch, {}, online)
    with pytest.raises(FileNotFoundError, match="org/nope: no such repo on the hub, or a private one"):
        load_tokenizer("org/nope")
    fake_hub(monkeypatch, {}, online, error=ConnectionError("Name or service not known"))
    with pytest.raises(FileNotFoundError, match="the hub cannot be reached .*ConnectionError.* not in the local hub "
                                                "cache"):
        load_tokenizer("org/nope")
    put(online, "org/cached", {"tokenizer.model": tiktoken_file(online / "t.model")})
    assert load_tokenizer("org/cached").kind == "tiktoken"  # unreachable hub: the cache answers


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


# ----------------------------------------------------------------------------------------------------------------------
# adapt.py as a cluster user types it: hub ids, a filled cache, HF_HUB_OFFLINE=1


def test_adapt_from_hub_ids_offline_with_and_without_data(tmp_path, sp_file):
    root = tmp_path / "hf" / "hub"
    _, files = tiny_model_repo(tmp_path, "gemma2", sp_file)
    put(root, "google/tiny-gemma-2", files)
    g = torch.Generator().manual_seed(0)
    params = {k: (torch.randn(*s, generator=g) * 0.1).numpy() for k, s in
              (("W_enc", (64, 128)), ("W_dec", (128, 64)), ("b_enc", (128,)), ("b_dec", (64,)))}
    params["threshold"] = np.full(128, 0.05, dtype=np.float32)
    np.savez(tmp_path / "params.npz", **params)
    sae = "google/gemma-scope-tiny-pt-res/layer_1/width_16k/average_l0_10"
    put(root, "google/gemma-scope-tiny-pt-res",
        {"layer_1/width_16k/average_l0_10/params.npz": str(tmp_path / "params.npz")})
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for name in ("textwrap.py", "argparse.py", "bisect.py", "shlex.py"):
        (corpus / name).write_text(open(os.path.join(os.path.dirname(os.__file__), name)).read())
    prepare(str(corpus), str(tmp_path / "data"), sp_file, val_tokens=2000, verbose=False, layout="bos_chunks")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(root), "OMP_NUM_THREADS": "1",
           "LORASAE_CACHE": str(tmp_path / "cache")}
    base = ["adapt.py", "--model", "google/tiny-gemma-2", "--sae", sae, "--max-tokens", "512", "--seq-len", "32",
            "--eval-tokens", "256", "--compile", "false", "--rank", "4"]
    for extra, out in (([f"--data={tmp_path / 'data'}"], "with-data"), ([], "no-data")):
        proc = subprocess.run([sys.executable, *base, *extra, "--out", str(tmp_path / out)], cwd=ROOT, env=env,
                              capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]
        res = json.load(open(tmp_path / out / "results.json"))
        assert res["sae_layers"] == [1] and res["lora_layers"] == [2, 3]  # JumpReLU: only the layers after it
        assert res["config"]["data"] == (str(tmp_path / "data") if extra else res["config"]["data"])
    assert os.path.basename(res["config"]["data"]).startswith("stdlib-")  # the corpus in this model's own tokens
    proc = subprocess.run([sys.executable, *base[:2], "google/not-cached", *base[3:]], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert "google/not-cached" in proc.stderr and "HF_HUB_OFFLINE" in proc.stderr
