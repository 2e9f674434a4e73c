"""
SAE files: every common release format read into one `SAE` (sae.py), the hub paths they live at, the SAEs a run
splices in, and the SAELens layout `SAE.save` writes.

    sae = SAE.from_pretrained("google/gemma-scope-2b-pt-res/layer_12/width_16k/average_l0_82")   # sae.py; read_sae here reads the files
    default_sae("google/gemma-2-2b", 12)     # -> that same path: the Gemma Scope SAE the paper uses at layer 12

Formats, told apart by the files a folder holds:
    Gemma Scope   params.npz
    Gemma Scope 2 params.safetensors (+ config.json)          (Gemma-3; google/gemma-scope-2-*)
    SAELens       cfg.json + sae_weights.safetensors      (v6 and older configs)
    sparsify      cfg.json + sae.safetensors              (EleutherAI; the paper's own SAEs, saved as model.layers.L)
    Llama Scope   hyperparams.json + checkpoints/final.safetensors
    dictionary_learning  ae.pt + config.json                 (saprmarks/dictionary_learning: SAEBench's SAEs, Karvonen's Qwen3 SAEs)
    Qwen Scope    layerN.sae.pt, in a repo named SAE-Res-MODEL-WnK-L0_K   (Qwen3 / Qwen3.5 TopK SAEs, as SAELens reads them)
Each reader (formats/sae_releases.py, formats/torch_saes.py) returns a spec in our layout with any input normalisation
folded into the weights; `sae_from_spec` checks it once and fills an SAE; `load_saes` places the SAEs a run splices in
at their layers. An SAE's layer comes from its config when it names one, else from its folder's name.
"""
from __future__ import annotations

import os
import re

import torch

from formats import disk
from formats import hub
from formats import torch_saes
from formats.sae_releases import (SERVED, load_gemma_scope, load_gemma_scope_2, load_llama_scope, load_saelens,
                                  load_sparsify, layer_from_path)
from formats.torch_saes import QWEN_SCOPE_SUFFIX
from sae import SAE

FORMATS = [  # (name, files that identify it) in the order they are tried
    ("gemma_scope", ("params.npz",)),
    ("gemma_scope_2", ("params.safetensors",)),
    ("saelens", ("cfg.json", "sae_weights.safetensors")),
    ("sparsify", ("cfg.json", "sae.safetensors")),
    ("llama_scope", ("hyperparams.json", "checkpoints/final.safetensors")),
    ("dictionary_learning", ("ae.pt", "config.json")),
]
OPTIONAL = {"gemma_scope_2": ("config.json",)}  # fetched with the weights when the folder has them
LOOKED_FOR = ("params.npz (Gemma Scope), params.safetensors (Gemma Scope 2), cfg.json + sae_weights.safetensors "
              "(SAELens), cfg.json + sae.safetensors "
              "(sparsify), hyperparams.json + checkpoints/final.safetensors (Llama Scope), ae.pt + config.json "
              "(dictionary_learning), layerN.sae.pt (Qwen Scope)")


# ----------------------------------------------------------------------------------------------------------------------
# Known models: the SAE the paper splices in at each layer

# The 16k-latent Gemma Scope residual SAEs SAELens calls canonical (releases gemma-scope-{2b,9b}-pt-res-canonical in
# its pretrained_saes.yaml map `layer_L/width_16k/canonical` to these folders of the public repos): average L0 of the
# folder at layer L. The paper's scripts load the same folders (layer 12 of Gemma-2-2B: average_l0_82).
GEMMA_SCOPE_RES_16K = {
    "google/gemma-2-2b": ("google/gemma-scope-2b-pt-res", [
        105, 102, 141, 59, 124, 68, 70, 69, 71, 73, 77, 80, 82, 84, 84, 78, 78, 77, 74, 73, 71, 70, 72, 75, 73, 116]),
    "google/gemma-2-9b": ("google/gemma-scope-9b-pt-res", [
        129, 69, 67, 90, 91, 77, 93, 92, 99, 100, 113, 118, 130, 132, 67, 131, 75, 73, 71, 132, 68, 129, 123, 120,
        114, 114, 116, 118, 119, 119, 120, 114, 111, 114, 114, 120, 120, 124, 128, 131, 125, 113]),
}


# Gemma Scope 2 (Gemma-3, pretrained and instruction-tuned): google/gemma-scope-2-{size}-{pt,it} holds residual SAEs
# of every layer under resid_post_all/layer_L_width_{16k,262k}_l0_{small,big} (SAELens' releases
# gemma-scope-2-*-res-all). The default is the 16k-latent one at the small L0, as for Gemma Scope; layers per size.
GEMMA_SCOPE_2_LAYERS = {"270m": 18, "1b": 26, "4b": 34, "12b": 48, "27b": 62}
GEMMA_SCOPE_2_DEFAULT = "resid_post_all/layer_{layer}_width_16k_l0_small"
_GEMMA3_ID = re.compile(r"google/gemma-3-(\d+[mb])-(pt|it)")


def default_sae(model_id: str, layer: int) -> str | None:
    """The hub path of the known SAE for (model, layer), or None when the model or layer has none."""
    model_id = str(model_id).strip("/")
    m = _GEMMA3_ID.fullmatch(model_id)
    if m and m.group(1) in GEMMA_SCOPE_2_LAYERS:
        if not 0 <= layer < GEMMA_SCOPE_2_LAYERS[m.group(1)]:
            return None
        return f"google/gemma-scope-2-{m.group(1)}-{m.group(2)}/" + GEMMA_SCOPE_2_DEFAULT.format(layer=layer)
    repo, l0s = GEMMA_SCOPE_RES_16K.get(model_id, (None, []))
    if repo is None or not 0 <= layer < len(l0s):
        return None
    return f"{repo}/layer_{layer}/width_16k/average_l0_{l0s[layer]}"


def known_saes() -> list[str]:
    """One line per known model family, for --help."""
    return [f"{m}: layer L -> {repo}/layer_L/width_16k/average_l0_<L0 of layer L> (layers 0-{len(l0s) - 1})"
            for m, (repo, l0s) in GEMMA_SCOPE_RES_16K.items()] + [
        f"google/gemma-3-SIZE-{{pt,it}}: layer L -> google/gemma-scope-2-SIZE-{{pt,it}}/"
        f"{GEMMA_SCOPE_2_DEFAULT.format(layer='L')} (Gemma Scope 2; SIZE "
        f"{', '.join(f'{s} (layers 0-{n - 1})' for s, n in GEMMA_SCOPE_2_LAYERS.items())})"]


# The authors (utils.get_sae_hook) splice hub SAEs (Gemma Scope, Llama Scope; here Gemma Scope 2 too)
# everywhere but at BOS and EOS tokens,
# and their own TopK SAEs (sparsify format) everywhere; SAELens-format SAEs (what train_sae.py writes, trained without
# BOS) go everywhere but BOS. BOS activations have outlier norms that most SAEs never saw in training.
AUTO_POSITIONS = {"gemma_scope": "no_bos_eos", "gemma_scope_2": "no_bos_eos", "llama_scope": "no_bos_eos",
                  "sparsify": "all", "saelens": "no_bos", "dictionary_learning": "no_bos", "qwen_scope": "no_bos"}



# ----------------------------------------------------------------------------------------------------------------------
# Finding the files


def read_sae(path: str) -> dict:
    """The SAE at a local path or hub path as a spec: its tensors and settings, whatever the release format, plus
    `source` (the folder), `format`, `layer` (its config's, else its folder name's) and `positions` (which positions
    it is spliced at, by where it comes from). `sae_from_spec` checks and builds it."""
    fmt, path = detect(resolve_sae(path))
    spec = LOADERS[fmt](path)
    if spec.get("layer") is None:
        spec["layer"] = layer_from_path(path)
    return dict(spec, source=path, format=fmt, positions=AUTO_POSITIONS[fmt])


def files_of(path: str) -> list[str]:
    """The files the SAE at `path` (local or hub) is read from: its format's files (what read_sae reads)."""
    fmt, where = detect(resolve_sae(path))
    if fmt == "gemma_scope":
        return [where]
    names = dict(FORMATS)[fmt] + OPTIONAL.get(fmt, ())
    return [os.path.join(where, n) for n in names if os.path.isfile(os.path.join(where, n))]


def resolve_sae(path: str) -> str:
    """A local file or folder as is; otherwise hub path `org/repo[/sub/folder]`: its file list says which format is
    there, and only that format's files are downloaded (or read from the cache offline)."""
    path = str(path)
    if os.path.exists(path):
        return path
    if not hub.is_hub_path(path, sub_folders=True):
        raise FileNotFoundError(f"{path}: no such file or folder (and not a hub path like "
                                f"'google/gemma-scope-2b-pt-res/layer_12/width_16k/average_l0_82')")
    if path.endswith(QWEN_SCOPE_SUFFIX) and path.count("/") >= 2:  # Qwen Scope: one file per layer, not a folder
        parent, name = path.rsplit("/", 1)
        return os.path.join(hub.resolve(parent, lambda files: _choose_one_file(files, name)), name)
    return hub.resolve(path, _choose_sae_files)


def _choose_one_file(files: dict[str, int], name: str) -> list[str]:
    if name not in files:
        layers = sorted(f for f in files if f.endswith(QWEN_SCOPE_SUFFIX))
        raise FileNotFoundError(f"no file {name}" + (f"; it holds {', '.join(layers[:4])}, ..." if layers else ""))
    return [name]


def _choose_sae_files(files: dict[str, int]) -> list[str]:
    for name, needed in FORMATS:
        if all(f in files for f in needed):
            return list(needed) + [f for f in OPTIONAL.get(name, ()) if f in files]
    folders = sorted({f.split("/")[0] for f in files if "/" in f})
    inside = f"; it holds the folders {', '.join(folders[:6])}{', ...' if len(folders) > 6 else ''}" if folders else ""
    raise ValueError(f"unknown SAE format: looked for {LOOKED_FOR}{inside}")


def detect(path: str) -> tuple[str, str]:
    """(format name, the path its loader reads): the .npz file for Gemma Scope, the folder otherwise."""
    if os.path.isfile(path):
        if path.endswith(".npz"):
            return "gemma_scope", path
        if path.endswith(QWEN_SCOPE_SUFFIX):
            return "qwen_scope", path
        path = os.path.dirname(path) or "."
    for name, files in FORMATS:
        if all(os.path.isfile(os.path.join(path, f)) for f in files):
            return name, os.path.join(path, files[0]) if name == "gemma_scope" else path
    raise ValueError(f"{path}: unknown SAE format; looked for {LOOKED_FOR}")


# ----------------------------------------------------------------------------------------------------------------------
# Reading: which reader reads which format (formats/sae_releases.py, formats/torch_saes.py)

LOADERS = {"gemma_scope": load_gemma_scope, "gemma_scope_2": load_gemma_scope_2, "saelens": load_saelens,
           "sparsify": load_sparsify,
           "llama_scope": load_llama_scope, "dictionary_learning": torch_saes.load_dictionary_learning,
           "qwen_scope": torch_saes.load_qwen_scope}


# ----------------------------------------------------------------------------------------------------------------------
# Building: a spec checked once and put into an SAE; the SAEs a run splices in


def load_sae(path: str, device=None, dtype=None):
    """The SAE at a local path or hub path (`SAE.from_pretrained`): read_sae's spec, built by sae_from_spec."""
    return sae_from_spec(read_sae(path), device=device, dtype=dtype)


def sae_from_spec(spec: dict, device=None, dtype=None):
    """Check shapes and values once, then put the tensors into an SAE (no random init for the real sizes)."""
    source = spec.get("source", "SAE")
    W_enc, W_dec = spec["W_enc"], spec["W_dec"]
    if W_enc.dim() != 2 or W_dec.dim() != 2:
        raise ValueError(f"{source}: W_enc and W_dec must be matrices, got {tuple(W_enc.shape)}, {tuple(W_dec.shape)}")
    d_in, d_sae = W_enc.shape
    shapes = dict(W_enc=(d_in, d_sae), W_dec=(d_sae, d_in), b_enc=(d_sae,), b_dec=(d_in,), threshold=(d_sae,),
                  W_skip=(d_in, d_in))
    for name, shape in shapes.items():
        t = spec.get(name)
        if t is not None and tuple(t.shape) != shape:
            raise ValueError(f"{source}: {name} has shape {tuple(t.shape)}, expected {shape} for d_in={d_in}, "
                             f"d_sae={d_sae}")
    for name in (*shapes, "topk_threshold"):
        t = spec.get(name)
        if t is not None and not t.is_floating_point():  # integer weights: a damaged or foreign file
            raise ValueError(f"{source}: {name} is {t.dtype}, not a floating-point tensor (damaged or foreign "
                             f"SAE file)")
        if t is not None and not torch.isfinite(t).all():
            raise ValueError(f"{source}: {name} contains NaN or inf values (corrupt or diverged SAE)")
    dtype = getattr(torch, dtype.removeprefix("torch.")) if isinstance(dtype, str) else dtype
    dtype = dtype or spec.get("dtype") or W_dec.dtype
    layer = spec.get("layer")
    try:
        sae = SAE(d_in, d_sae, spec["arch"], k=spec.get("k"), apply_b_dec_to_input=spec["apply_b_dec_to_input"],
                  layer=layer, model_name=spec.get("model_name"), device="meta", dtype=dtype)
    except ValueError as e:
        raise ValueError(f"{source}: {e}") from None
    cast = lambda t: t.to(device=device or "cpu", dtype=dtype) if t is not None else None  # noqa: E731
    sae._assign(*(cast(spec.get(n)) for n in ("W_enc", "W_dec", "b_enc", "b_dec", "threshold")))
    if sae.arch == "batchtopk":
        sae.topk_threshold = cast(spec["topk_threshold"] if spec.get("topk_threshold") is not None
                                  else torch.zeros(())).reshape(())
    sae.hook_name = spec.get("hook_name")
    sae.transcoder = bool(spec.get("transcoder"))
    if spec.get("W_skip") is not None:
        sae.W_skip = torch.nn.Parameter(cast(spec["W_skip"]))
    sae.source_format, sae.positions = spec.get("format"), spec.get("positions", "no_bos")
    return sae.eval()


def load_saes(paths: list[str], layers: list[int] | None, model, device) -> list[tuple[int, SAE]]:
    """(layer, frozen SAE) pairs sorted by layer; each layer from `layers` or else from the SAE's own files."""
    if layers is not None and len(layers) != len(paths):
        raise ValueError(f"--layer names {len(layers)} layers for {len(paths)} SAEs: give one per --sae")
    saes = []
    for i, path in enumerate(paths):
        sae = load_sae(path, device=device)
        if sae.site is None:
            raise ValueError(f"{path}: this SAE reads {sae.hook_name}, which the splice cannot replace; it serves "
                             f"{SERVED}")
        layer = layers[i] if layers is not None else sae.layer
        if layer is None:
            raise ValueError(f"{path}: the SAE files do not say which layer it reads; pass --layer")
        if not 0 <= layer < model.cfg.n_layer:
            raise ValueError(f"{path}: layer {layer} is out of range: the model has layers 0..{model.cfg.n_layer - 1}")
        heads = model.cfg.n_head * model.cfg.head_dim
        sae.check_d_in(heads if sae.site == "attn_z" else model.cfg.d_model, where=path,
                       what="attention heads' output (attn.hook_z) has n_head * head_dim" if sae.site == "attn_z"
                       else "residual stream has d_model")
        sae.requires_grad_(False).eval()
        sae.path = path  # which files it came from: an adapter records the SAEs it is trained around
        saes.append((layer, sae))
    if len({layer for layer, _ in saes}) != len(saes):
        raise ValueError("two SAEs at the same layer: give each --sae its own --layer")
    return sorted(saes, key=lambda p: p[0])


# ----------------------------------------------------------------------------------------------------------------------
# Writing


def save_saelens(sae, folder: str):
    """SAELens v6 layout (cfg.json + sae_weights.safetensors), each file written to a temp name then renamed."""
    from safetensors.torch import save_file
    os.makedirs(folder, exist_ok=True)
    tensors = {n: getattr(sae, n).detach().contiguous().cpu() for n in ("W_enc", "W_dec", "b_enc", "b_dec")}
    if sae.arch == "jumprelu":
        tensors["threshold"] = sae.threshold.detach().contiguous().cpu()
    if sae.arch == "batchtopk":
        tensors["topk_threshold"] = sae.topk_threshold.detach().cpu()
    hook = sae.hook_name or (f"blocks.{sae.layer}.{'ln2.hook_normalized' if sae.transcoder else 'hook_resid_post'}"
                             if sae.layer is not None else None)
    cfg = dict(architecture=sae.arch, d_in=sae.d_in, d_sae=sae.d_sae,
               dtype=str(sae.W_dec.dtype).removeprefix("torch."), device="cpu",
               apply_b_dec_to_input=sae.apply_b_dec_to_input, normalize_activations="none",
               reshape_activations="none",
               # SAELens reads a config as v6 only if it names a version >= 6; this is the layout version we write
               metadata=dict(model_name=sae.model_name, hook_name=hook, hook_layer=sae.layer,
                             hook_head_index=None, sae_lens_version="6.0.0", sae_lens_training_version="6.0.0"))
    if sae.transcoder:  # SAELens' transcoder fields: the output point and its width
        cfg["d_out"], cfg["metadata"]["hook_name_out"] = sae.d_in, f"blocks.{sae.layer}.hook_mlp_out"
    if sae.W_skip is not None:
        tensors["W_skip"] = sae.W_skip.detach().contiguous().cpu()
    if sae.k is not None:
        cfg["k"] = sae.k
    with disk.atomic_path(os.path.join(folder, "sae_weights.safetensors")) as tmp:
        save_file(tensors, tmp, {"format": "pt"})
    disk.write_json(os.path.join(folder, "cfg.json"), cfg)

