"""hub.py and its users offline: a Hugging Face cache laid out as huggingface_hub writes it, with HF_HUB_OFFLINE=1.

Each model family, each tokenizer layout, each SAE format at a sub-path, the hub datasets, and the one-line errors;
the hub itself (unreachable here) is replaced by fakes of HfApi.list_repo_tree and hf_hub_download where online
behaviour is tested, and RedPajama-V2's document server by a local folder or an http.server on a thread."""
import base64
import hashlib
import json
import os
import subprocess
import sys
import types

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from formats import hub
from data import prepare
from formats.tokenizer import load_tokenizer
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
    code = ("import model; from formats import sae_files; from formats.tokenizer import load_tokenizer\n"
            "print(load_tokenizer('meta-llama/Tiny').kind, model.Transformer.from_pretrained('meta-llama/Tiny')"
            ".cfg.n_layer)\n"
            "try:\n    load_tokenizer('meta-llama/Not-Cached')\nexcept FileNotFoundError as e:\n    print(e)\n")
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
