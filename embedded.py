"""
The offline pipeline: what every script uses when no --model is given, built on first use and cached.

    corpus     the Python standard library's source, a 4096-token BPE trained on it      (corpus_and_tokenizer below)
    model      a 3.0M-parameter Gemma-2-architecture model pretrained on that corpus       (pretrain.py)
    SAE        a TopK SAE on the middle layer's residual stream                            (train_sae.py)

Each script has a preset below: the settings that replace the paper's values (sized for a few CPU cores, not a GPU
cluster). A preset fills only the flags the user did not type, so `python adapt.py --lr 5e-5` trains at 5e-5.

Each artefact's folder is named by a hash of its recipe: the model's by pretrain.PretrainRecipe's fields and the
corpus settings (tiny-gemma2-<hash>), the SAE's by the SAE recipe below, its layer and the sha256 of the weights it
reads (sae-tiny-gemma2-<hash>-L2-<hash>). A folder of that name is looked for in the cache, out/cache
(LORASAE_CACHE moves it), then in shipped/, which holds the default recipe's model (with its tokenizer) and SAE as
the project's own commands built them (shipped/README.md: the commands, the machine, the time, the loss). A changed
recipe has another name, so it is built in the cache beside the old one; `python pretrain.py` and `python
train_sae.py --out DIR` build from scratch whatever is shipped.

The stdlib differs between Python versions. The model's name does not include the Python version, so that the
shipped files serve every Python: the model is used with the local stdlib tokenized by the model's own tokenizer
(cached per tokenizer), and on a Python other than the one that built it (shipped/README.md) the held-out split may
hold a few files that the model trained on in their other version.

Layering: this library module calls two scripts' run() (pretrain.py, train_sae.py), imported inside the functions
that build. It must, so that an artefact built on first use is exactly what its command writes, and so that each
script keeps its loop and reads top to bottom (nanoGPT style) instead of moving it here.
"""
from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import os
import textwrap
import time

import torch

import common
import data
from corpus import read_text, stdlib_files
from sae_formats import GEMMA_SCOPE_RES_16K, default_sae, known_saes

TINY_LAYERS = 4  # the embedded model's depth (pretrain.py's default), for one-line errors before anything is built
SAE_LAYER = TINY_LAYERS // 2
SHIPPED = os.path.join(os.path.dirname(os.path.abspath(__file__)), "shipped")  # the default recipe, prebuilt

# The embedded SAE recipe (Gao et al.'s TopK recipe at a small scale); `python train_sae.py` runs the same
SAE = dict(layer=[SAE_LAYER], k=16, expansion=8, max_tokens=4_000_000, batch_tokens=4096, buffer_tokens=131_072,
           seq_len=256, model_batch=16, dead_tokens=1_000_000, eval_interval=250, log_interval=50)

PRESETS = {
    # sized for a first result in minutes on 2 CPU cores in fp32; lr 3e-3 beat 1e-3 and 6e-3 (experiments/README.md)
    "adapt": dict(seq_len=256, batch_size=8, max_tokens=700_000, lr=3e-3, weight_decay=0.0,
                  dropout=0.0, warmup_frac=0.02, decay_frac=1.0, min_lr_frac=0.1, schedule="cosine",
                  kl_reduction="token", eval_tokens=32_768, eval_interval=100, ckpt_interval=100, log_interval=10,
                  kl_chunk=1024, out="out/adapt-tiny"),
    "train_sae": dict(SAE, out="out/sae-tiny"),
    "train_e2e": dict(layer=[SAE_LAYER], k=16, expansion=8, max_tokens=1_500_000, batch_size=8, seq_len=256,
                      dead_tokens=1_000_000, eval_interval=50, log_interval=10, out="out/e2e-tiny"),
    "eval": dict(seq_len=256, batch_size=8, eval_tokens=65_536, gen_tokens=64, out="out/eval-tiny"),
}


KNOWN_MODELS = sorted(GEMMA_SCOPE_RES_16K)
DEFAULT_SAES_HELP = ("SAE defaults when --sae is not given (the paper's SAEs, one per --layer L):\n" +
                     "".join(f"  {line}\n" for line in known_saes()) +
                     "  no --model: the embedded tiny model's TopK SAE at --layer (trained on first use)\n")


def preset_help(script: str) -> str:
    """--help's last lines: what the tiny model's preset puts in place of the defaults listed above."""
    flags = " ".join(f"--{k.replace('_', '-')} {' '.join(map(str, v)) if isinstance(v, list) else v}"
                     for k, v in PRESETS[script].items())
    return "\n".join(textwrap.wrap(f"without --model, the tiny model's preset (embedded.PRESETS[{script!r}]) replaces "
                                    f"these defaults, for the flags not typed: {flags}", 100))


def cache_dir() -> str:
    """Where the embedded pipeline caches what it builds (under out/, with every other output)."""
    return os.environ.get("LORASAE_CACHE") or os.path.join("out", "cache")


def corpus() -> str:
    """The token folder of the stdlib corpus in the embedded model's own tokens (built once)."""
    return corpus_for(model())


def model_dir(cfg=None) -> str:
    """Where the tiny model with pretrain.py's settings `cfg` (default: its defaults) is built: the cache folder
    named by its recipe, pretrain.PretrainRecipe's fields and the corpus settings."""
    import pretrain
    cfg = cfg or pretrain.PretrainConfig()
    recipe = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(pretrain.PretrainRecipe)}
    recipe.update(corpus_vocab=CORPUS_VOCAB, corpus_val_tokens=CORPUS_VAL_TOKENS)
    return os.path.join(cache_dir(), f"tiny-{recipe['family']}-{_key(recipe)}")


def sae_dir(layer: int, model_path: str) -> str:
    """Where the embedded SAE at `layer` of the model in `model_path` is built: the cache folder named by the SAE
    recipe above and the sha256 of the weights it reads."""
    recipe = dict(SAE, layer=[layer], model_sha256=data._sha256(os.path.join(model_path, "model.safetensors")))
    return os.path.join(cache_dir(), f"sae-{os.path.basename(model_path)}-L{layer}-{_key(recipe)}")


def model() -> str:
    """The tiny model's folder: the cached or shipped one of pretrain.py's default recipe, else pretrained now."""
    out = model_dir()

    def build():
        import pretrain
        common.log(f"embedded model: pretraining a tiny Gemma-2 in {out} (first run only)")
        resume = os.path.isfile(os.path.join(out, "train_state.pt"))  # a build that was killed goes on
        pretrain.run(pretrain.PretrainConfig(out=out, data=corpus_and_tokenizer()[0], resume=resume), d=_one_process())
    return _once(out, "model.safetensors", build, "pretraining")


def sae(layer: int = SAE_LAYER) -> str:
    """The embedded TopK SAE at `layer` of the tiny model: the cached or shipped one of the SAE recipe above, else
    trained now."""
    model_path = model()
    out = sae_dir(layer, model_path)

    def build():
        import train_sae
        common.log(f"embedded SAE: training a TopK SAE on layer {layer} in {out} (first run only)")
        resume = os.path.isfile(os.path.join(out, "state.pt"))  # a build that was killed goes on
        cfg = train_sae.TrainSAEConfig(**dict(SAE, model=model_path, data=corpus(), out=out, layer=[layer],
                                              resume=resume))
        train_sae.run(cfg, d=_one_process())
    return _once(out, "cfg.json", build, f"SAE training (layer {layer})")


def _key(recipe: dict) -> str:
    return hashlib.sha256(json.dumps(recipe, sort_keys=True, default=str).encode()).hexdigest()[:8]


def _one_process() -> common.Dist:
    return common.Dist(device=torch.device("cuda" if torch.cuda.is_available() else "cpu"))


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


def fill(cfg, typed: set[str], script: str, *, need_data: bool = True):
    """What the user left out. No --model: the preset for `script` fills the untyped flags and the model is the tiny
    one. No --data: the embedded corpus, in the model's own tokens. No --sae (scripts that splice one): the embedded
    SAE on the tiny model, Gemma Scope's canonical SAE at --layer on Gemma-2 2B / 9B, else a one-line error."""
    tiny = cfg.model is None
    if tiny:
        common.fill(cfg, typed, PRESETS[script], "preset")
        common.log_preset(cfg, "preset", f"{script}.py: no --model, so the tiny model's preset (embedded.PRESETS"
                                         f"[{script!r}]) replaces these defaults (typed flags win):")
        check_layers(getattr(cfg, "layer", []) or [], f"{script}.py")
        cfg.model = model()
    if getattr(cfg, "data", "") is None and need_data:
        cfg.data = corpus() if tiny else corpus_for(cfg.model)
    if hasattr(cfg, "sae") and not cfg.sae:
        cfg.sae = [sae(layer) for layer in cfg.layer or [SAE_LAYER]] if tiny else default_saes(cfg.model, cfg.layer)
    return cfg


def corpus_for(model_id: str) -> str:
    """The stdlib corpus tokenized by a real model's own tokenizer (cached per tokenizer)."""
    return corpus_and_tokenizer(tokenizer=model_id)[0]


def default_saes(model_id: str, layers: list[int]) -> list[str]:
    """The paper's SAEs for a known model: one per --layer."""
    paths = [default_sae(model_id, layer) for layer in layers]
    if not layers or None in paths:
        raise ValueError(f"no --sae given{' and no --layer' if not layers else ''}: pass --sae FOLDER_OR_HUB_PATH "
                         f"(defaults exist only for {', '.join(KNOWN_MODELS)} with --layer L)")
    return paths


# ----------------------------------------------------------------------------------------------------------------------
# The corpus: the Python standard library's sources (offline and the same for the same Python)


CORPUS_VOCAB = 4096
CORPUS_VAL_TOKENS = 200_000  # held out: whole files never seen in training


def corpus_and_tokenizer(cache: str | None = None, tokenizer=None) -> tuple[str, str]:
    """Build once and cache the offline default: the stdlib corpus as token shards. Returns (data_dir, tokenizer_path);
    later calls return at once. Without a tokenizer: a 4096-token BPE trained on the corpus (cache/stdlib). With one
    (a model's own: a Tokenizer, file, model folder or hub id), the corpus tokenized by it, cached per tokenizer file
    (cache/stdlib-<sha256 prefix>): a hub model runs without --data, offline once its files are cached."""
    cache = cache or cache_dir()
    if tokenizer is not None:
        tok = tokenizer if isinstance(tokenizer, data.Tokenizer) else data.load_tokenizer(tokenizer)
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


def train_tokenizer(text_files: list[str], out_path: str, vocab_size: int = 4096) -> data.Tokenizer:
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
    with common.atomic_path(out_path) as tmp, open(tmp, "wb") as f:
        f.write(model.getvalue())
    return data.Tokenizer(out_path)


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
