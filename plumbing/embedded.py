"""
The offline pipeline: what every script uses when no --model is given, built on first use and cached.

    corpus     the Python standard library's source, a 4096-token BPE trained on it      (formats/stdlib_corpus.py)
    model      a 3.0M-parameter Gemma-2-architecture model pretrained on that corpus       (pretrain.py)
    SAE        a TopK SAE on the middle layer's residual stream                            (train_sae.py)

Each script has a preset, config/<script>_tiny.py: the settings that replace the paper's values (sized for a few CPU
cores, not a GPU cluster). `fill_in` applies it to the flags the user did not type, so `python adapt.py --lr 5e-5`
trains at 5e-5.

Each artefact's folder is named by a hash of its recipe: the model's by PretrainRecipe's fields (below) and the
corpus settings (tiny-gemma2-<hash>, model_dir), the SAE's by the SAE recipe below, its layer and the sha256 of the weights it
reads (sae-tiny-gemma2-<hash>-L2-<hash>). A folder of that name is looked for in the cache, out/cache
(LORASAE_CACHE moves it), then in shipped/, which holds the default recipe's model (with its tokenizer) and SAE as
the project's own commands built them (shipped/README.md: the commands, the machine, the time, the loss). A changed
recipe has another name, so it is built in the cache beside the old one; `python pretrain.py` and `python
train_sae.py --out DIR` build from scratch whatever is shipped.

The stdlib differs between Python versions. The model's name does not include the Python version, so that the
shipped files serve every Python: the model is used with the local stdlib tokenized by the model's own tokenizer
(cached per tokenizer), and on a Python other than the one that built it (shipped/README.md) the held-out split may
hold a few files that the model trained on in their other version.

Layering: the scripts import this module for their defaults (pretrain.py its recipe), so it imports none of them. It
builds the model and the SAE by running `python pretrain.py` and `python train_sae.py` with the recipe's flags: an artefact built on first use is exactly what its command writes, and each script keeps its
loop, reading top to bottom (nanoGPT style).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import subprocess
import sys
import textwrap
import time
from dataclasses import dataclass

from plumbing import common
import config
import data
from formats import disk, stdlib_corpus
from formats.checkpoint import resolve_model_dir
from formats.sae_files import GEMMA_SCOPE_2_LAYERS, GEMMA_SCOPE_RES_16K, default_sae, known_saes

TINY_LAYERS = 4  # the embedded model's depth (pretrain.py's default), for one-line errors before anything is built
SAE_LAYER = TINY_LAYERS // 2
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the project root: the scripts it launches
SHIPPED = os.path.join(ROOT, "shipped")  # the default recipe, prebuilt

# The embedded model's recipe: pretrain.py's defaults (its PretrainConfig adds what does not change the weights)
@dataclass
class PretrainRecipe:
    """What decides the weights. The embedded pipeline names the model's cache folder by a hash of these fields
    (model_dir below); pretrain.PretrainConfig adds the settings that do not change what is trained."""
    family: str = "gemma2"  # gemma2 | llama3
    d_model: int = 192  # width (the default shape, 3.0M parameters, won a size sweep: experiments/README.md)
    n_layer: int = 4  # decoder blocks
    n_head: int = 6  # attention heads
    n_kv_head: int = 3  # key/value heads (grouped-query attention)
    head_dim: int = 32  # width of each head
    d_ff: int = 768  # MLP hidden width
    sliding_window: int = 64  # Gemma-2's local layers (shorter than seq_len so that it matters)
    seq_len: int = 256  # tokens per sequence
    batch_size: int = 16  # sequences per optimizer step, over all processes (and grad_accum micro-steps)
    grad_accum: int = 1  # micro-steps accumulated per optimizer step
    max_steps: int = 1000  # about 4M tokens, 1.2 epochs of the stdlib corpus
    lr: float = 6e-3  # AdamW peak learning rate
    min_lr_frac: float = 0.1  # the cosine decay ends at lr x this
    warmup_frac: float = 0.05  # fraction of the steps warming up linearly
    weight_decay: float = 0.1  # AdamW weight decay of the matrices and embeddings (norms: none)
    beta1: float = 0.9  # AdamW beta1
    beta2: float = 0.95  # AdamW beta2
    grad_clip: float = 1.0  # gradient norm clip
    autocast: str = "auto"  # activation precision: auto (bfloat16 where the hardware runs it natively, else
    # float32) | bfloat16 | float32
    seed: int = 0  # initialisation and data order



# The embedded SAE recipe: config/train_sae_tiny.py but its output folder; `python train_sae.py` runs the same
SAE = {k: v for k, v in config.preset("train_sae").items() if k != "out"}

KNOWN_MODELS = sorted(GEMMA_SCOPE_RES_16K) + [f"google/gemma-3-{{{','.join(GEMMA_SCOPE_2_LAYERS)}}}-{{pt,it}}"]
DEFAULT_SAES_HELP = ("SAE defaults when --sae is not given (the paper's SAEs, one per --layer L):\n" +
                     "".join(f"  {line}\n" for line in known_saes()) +
                     "  no --model: the embedded tiny model's TopK SAE at --layer (trained on first use)\n")


def preset_help(script: str) -> str:
    """--help's last lines: what the tiny model's preset (config/<script>_tiny.py) puts in place of the defaults
    above."""
    flags = " ".join(f"--{k.replace('_', '-')} {' '.join(map(str, v)) if isinstance(v, list) else v}"
                     for k, v in config.preset(script).items())
    return "\n".join(textwrap.wrap(f"without --model, the tiny model's preset ({config.path(script)}) replaces these "
                                    f"defaults, for the flags not typed: {flags}", 100))


def corpus() -> str:
    """The token folder of the stdlib corpus in the embedded model's own tokens (built once)."""
    return corpus_for(model())


def model_dir(cfg) -> str:
    """Where the tiny model of `cfg`'s recipe (a PretrainRecipe, or pretrain.py's config) is cached: a folder named by
    PretrainRecipe's fields and the corpus settings, so that a changed recipe is built beside the old one."""
    recipe = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(PretrainRecipe)}
    recipe.update(corpus_vocab=stdlib_corpus.CORPUS_VOCAB, corpus_val_tokens=stdlib_corpus.CORPUS_VAL_TOKENS)
    return os.path.join(disk.cache_dir(), f"tiny-{recipe['family']}-{recipe_key(recipe)}")


def recipe_key(recipe: dict) -> str:
    """8 hex digits naming a recipe (the model's, the SAE's)."""
    return hashlib.sha256(json.dumps(recipe, sort_keys=True, default=str).encode()).hexdigest()[:8]


def sae_dir(layer: int, model_path: str) -> str:
    """Where the embedded SAE at `layer` of the model in `model_path` is built: the cache folder named by the SAE
    recipe above and the sha256 of the weights it reads."""
    recipe = dict(SAE, layer=[layer], model_sha256=data._sha256(os.path.join(model_path, "model.safetensors")))
    return os.path.join(disk.cache_dir(), f"sae-{os.path.basename(model_path)}-L{layer}-{recipe_key(recipe)}")


def model() -> str:
    """The tiny model's folder: the cached or shipped one of pretrain.py's default recipe, else pretrained now."""
    out = model_dir(PretrainRecipe())

    def build():
        common.log(f"embedded model: pretraining a tiny Gemma-2 in {out} (first run only)")
        resume = any(os.path.isfile(os.path.join(out, n)) for n in ("ckpt.pt", "train_state.pt"))  # killed: go on
        run_script("pretrain.py", dict(out=out, data=stdlib_corpus.corpus_and_tokenizer()[0], resume=resume))
    return _once(out, "model.safetensors", build, "pretraining")


def sae(layer: int = SAE_LAYER) -> str:
    """The embedded TopK SAE at `layer` of the tiny model: the cached or shipped one of the SAE recipe above, else
    trained now."""
    model_path = model()
    out = sae_dir(layer, model_path)

    def build():
        common.log(f"embedded SAE: training a TopK SAE on layer {layer} in {out} (first run only)")
        resume = any(os.path.isfile(os.path.join(out, n)) for n in ("ckpt.pt", "state.pt"))  # killed: go on
        run_script("train_sae.py", dict(SAE, model=model_path, data=corpus(), out=out, layer=[layer], resume=resume))
    return _once(out, "cfg.json", build, f"SAE training (layer {layer})")


TORCHRUN_VARS = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "GROUP_RANK",
                 "ROLE_RANK", "ROLE_WORLD_SIZE", "TORCHELASTIC_RUN_ID")


def run_script(script: str, flags: dict):
    """`python SCRIPT --flag value ...` in one process, its output shown: an artefact built on first use is exactly
    what its command writes (and this module imports no script that imports it)."""
    argv = [f"--{k.replace('_', '-')}={v}" for k, vs in flags.items() for v in (vs if isinstance(vs, list) else [vs])]
    env = {k: v for k, v in os.environ.items() if k not in TORCHRUN_VARS}  # rank 0 builds alone, as one process
    proc = subprocess.run([sys.executable, os.path.join(ROOT, script), *argv], env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"{script} {' '.join(argv)} failed (exit code {proc.returncode}); its output is above")


_SAID = set()


def _once(folder: str, marker: str, build, stage: str) -> str:
    """`folder` (in the cache) if its `marker` file exists, else the shipped folder of that name, else `folder`
    built now, saying how long that took. Under torchrun (before the process group is up) rank 0 builds it in one
    process and the other ranks wait for the marker."""
    shipped = os.path.join(SHIPPED, os.path.basename(folder))
    if not os.path.isfile(os.path.join(folder, marker)) and os.path.isfile(os.path.join(shipped, marker)):
        if shipped not in _SAID:  # once per process: fill, corpus and sae all ask for the model
            _SAID.add(shipped)
            common.log(f"embedded pipeline: {stage} skipped, the same recipe is shipped in {shipped} (how it was "
                       f"built: shipped/README.md)")
        return shipped
    path = os.path.join(folder, marker)
    if not os.path.isfile(path):
        t0 = time.time()
        if int(os.environ.get("RANK", "0")) == 0:
            build()
        while not os.path.isfile(path):
            time.sleep(5)
        common.log(f"embedded pipeline: {stage} done in {time.time() - t0:.0f}s; cached in {folder}")
    return folder


def check_layers(layers: list[int], script: str):
    """A layer the tiny model does not have: say so, and what to run instead (the paper's usual setting, e.g. layer 12
    of Gemma-2-2B)."""
    bad = [layer for layer in layers if not 0 <= layer < TINY_LAYERS]
    if bad:
        raise ValueError(f"--layer {bad[0]}: the embedded tiny model has {TINY_LAYERS} layers (0..{TINY_LAYERS - 1}); "
                         f"for the paper's run on Gemma-2-2B: torchrun {script} --model google/gemma-2-2b "
                         f"--layer {bad[0]} --rank 64")


def fill_in(cfg, typed: set[str], script: str, *, need_data: bool = True):
    """What the user left out. No --model: config/<script>_tiny.py fills the untyped flags and the model is the tiny
    one. No --data: the embedded corpus, in the model's own tokens. No --sae (scripts that splice one): the embedded
    SAE on the tiny model, Gemma Scope's canonical SAE at --layer on Gemma-2 2B / 9B, else a one-line error."""
    tiny = cfg.model is None
    if tiny:
        common.set_untyped(cfg, typed, config.preset(script), "preset")
        common.log_preset(cfg, "preset", f"{script}.py: no --model, so the tiny model's preset ({config.path(script)}) "
                                         f"replaces these defaults (typed flags win):")
        check_layers(getattr(cfg, "layer", []) or [], f"{script}.py")
        cfg.model = model()
    if getattr(cfg, "data", "") is None and need_data:
        if not tiny:
            resolve_model_dir(cfg.model)  # a --model that names nothing fails here as the model, not as its tokenizer
        cfg.data = corpus() if tiny else corpus_for(cfg.model)
    if hasattr(cfg, "sae") and not cfg.sae:
        cfg.sae = [sae(layer) for layer in cfg.layer or [SAE_LAYER]] if tiny else default_saes(cfg.model, cfg.layer)
    return cfg


def corpus_for(model_id: str) -> str:
    """The stdlib corpus tokenized by a real model's own tokenizer (cached per tokenizer)."""
    return stdlib_corpus.corpus_and_tokenizer(tokenizer=model_id)[0]


def default_saes(model_id: str, layers: list[int]) -> list[str]:
    """The paper's SAEs for a known model: one per --layer."""
    paths = [default_sae(model_id, layer) for layer in layers]
    if not layers or None in paths:
        raise ValueError(f"no --sae given{' and no --layer' if not layers else ''}: pass --sae FOLDER_OR_HUB_PATH "
                         f"(defaults exist only for {', '.join(KNOWN_MODELS)} with --layer L)")
    return paths
