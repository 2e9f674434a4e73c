"""saebench.py against SAEBench's own functions (the sae-bench package, tests only) on the same cached activations, and
metric sanity checks that fail when a metric is wrong."""
import contextlib
import math
import sys
import types

import pytest
import torch
import torch.nn.functional as F

from evals import saebench as sb
from evals import saebench_data as sd
from model import ModelConfig, Transformer
from sae import SAE
from tests.need import need


@pytest.fixture(scope="module")
def ref():
    """SAEBench's eval modules. Their module tops import sae_lens / transformer_lens / datasets (hundreds of MB, and a
    torch pin), which the functions compared here never call: those names are stubbed in sys.modules, and only when
    the real package is absent."""
    need("sklearn")  # SAEBench's probe trainer
    need("sae_bench")
    import jaxtyping
    # SAEBench's shape annotations bind a dimension name across nested calls (a class's 60 texts vs the 120-row probe
    # set built from them) and reject calls its own pipeline makes: shape checking off, the functions unchanged
    jaxtyping.config.update("jaxtyping_disable", True)
    saved = dict(sys.modules)

    class Any_:
        pass
    for name in ("sae_lens", "sae_lens.saes", "sae_lens.saes.sae", "sae_lens.loading",
                 "sae_lens.loading.pretrained_saes_directory", "sae_lens.training", "sae_lens.training.activations_store",
                 "transformer_lens", "transformer_lens.hook_points", "datasets"):
        try:
            __import__(name)
        except ImportError:
            m = types.ModuleType(name)
            m.__dict__.update(SAE=Any_, SAEMetadata=Any_, HookedTransformer=Any_, HookedRootModule=Any_,
                              ActivationsStore=Any_, get_pretrained_saes_directory=dict, load_dataset=None)
            sys.modules[name] = m
    import sae_bench.evals.absorption.feature_absorption_calculator as fac
    import sae_bench.evals.absorption.k_sparse_probing as ksp
    import sae_bench.evals.core.main as core
    import sae_bench.evals.absorption.probing as probing
    import sae_bench.evals.scr_and_tpp.main as scr
    import sae_bench.evals.sparse_probing.probe_training as pt
    import sae_bench.sae_bench_utils.activation_collection as ac
    try:
        import sae_bench.evals.absorption.main as absorption_main
    except ImportError:  # its module top needs more of sae_lens than the stubs give
        absorption_main = None
    yield types.SimpleNamespace(pt=pt, scr=scr, core=core, fac=fac, ksp=ksp, probing=probing, ac=ac,
                                absorption_main=absorption_main)
    for name in set(sys.modules) - set(saved):
        if name.split(".")[0] in ("sae_lens", "transformer_lens", "datasets"):
            del sys.modules[name]
    torch.set_grad_enabled(True)  # SAEBench's probe trainers flip the global switch


def class_data(n_classes, n, dim, seed, signal=1.5):
    g = torch.Generator().manual_seed(seed)
    return {str(c): (torch.rand(n, dim, generator=g) + signal * F.one_hot(torch.full((n,), c), dim)
                     * torch.rand(n, 1, generator=g)).relu() for c in range(n_classes)}


def test_sparse_probing_matches_saebench(ref):
    """Top-k probes: same sampled data (same RNG calls), logistic regression at its optimum vs sklearn's lbfgs
    (tolerance 1e-4): the accuracies agree to one test example. The full-width probe replays train_probe_gpu: exact."""
    train, test = class_data(4, 60, 40, 0, 0.4), class_data(4, 30, 40, 1, 0.4)
    for k in (1, 2, 5):
        torch.manual_seed(7)
        ours = sb.probe_accuracies(train, test, k)
        torch.manual_seed(7)
        theirs = ref.pt.train_probe_on_activations(train, test, select_top_k=k)[1]
        assert all(abs(ours[c] - theirs[c]) <= 1 / 60 + 1e-9 for c in train), (k, ours, theirs)
    torch.manual_seed(3)
    ours = sb.probe_accuracies(train, test)
    torch.manual_seed(3)
    theirs = ref.pt.train_probe_on_activations(train, test, use_sklearn=False, batch_size=250, epochs=100, lr=1e-2)[1]
    assert ours == pytest.approx(theirs, abs=1e-6)


def topk_sae(d, m, k, seed):
    """A TopK SAE with zero biases: it encodes an all-zero (masked) position to zero latents, where SAEBench's
    ablation would otherwise add those latents' decoder rows back in (see saebench.py's docstring)."""
    torch.manual_seed(seed)
    return SAE(d, m, "topk", k=k, layer=0).requires_grad_(False)


def bld(keys, n, L, d, seed, shift):
    """Per key (N, L, D) activations with masked positions already zero, as SAEBench caches them."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for i, key in enumerate(keys):
        x = torch.randn(n, L, d, generator=g) + shift[i % len(shift)]
        x[:, :1] = 0  # BOS
        x[torch.arange(n) % 3 == 0, -1] = 0  # padding on every third sequence
        out[key] = x
    return out


def pool(acts, sae):
    out = {}
    for key, x in acts.items():
        keep = (x.sum(-1) != 0).float()[..., None]
        n = keep.sum(1)
        out[key] = torch.cat([(x * keep).sum(1) / n, (sae.encode(x) * keep).sum(1) / n], 1)
    return out


@pytest.mark.parametrize("scr", [True, False])
def test_scr_tpp_match_saebench(ref, scr):
    """Same probes, same cached activations, same seed: SAEBench's clean / ablated accuracies and SCR / TPP scores are
    reproduced exactly (1e-6) from pooled features, the ablation done as a linear correction of the pooled residual."""
    d, m, ns = 8, 32, [1, 2, 5, 20]
    keys = list(sd.SCR_KEYS) + list(sd.SCR_KEYS.values()) if scr else ["0", "1", "2", "3"]
    shift = [torch.linspace(-1, 1, d) * s for s in (1.0, -1.0, 0.5, -0.5, 0.2, -0.2)]
    train, test = bld(keys, 48, 5, d, 0, shift), bld(keys, 24, 5, d, 1, shift)
    sae = topk_sae(d, m, 4, 0)
    classes = list(sd.SCR_KEYS) if scr else keys
    torch.manual_seed(0)
    probes = ref.pt.train_probe_on_activations(
        ref.scr.activation_collection.create_meaned_model_activations(train),
        ref.scr.activation_collection.create_meaned_model_activations(test), select_top_k=None, use_sklearn=False,
        batch_size=16, epochs=5, lr=1e-3, perform_scr=scr, l1_penalty=1e-3)[0]
    torch.set_grad_enabled(False)
    torch.manual_seed(11)
    clean = ref.scr.get_probe_test_accuracy(probes, classes,
                                            ref.scr.activation_collection.create_meaned_model_activations(test), 500, scr)
    effects = ref.scr.get_all_node_effects_for_one_sae(sae, probes, classes, scr, train, 125)
    ablated = ref.scr.perform_feature_ablations(probes, sae, 125, test, effects, ns, classes, 500, scr)
    theirs = ref.scr.get_scr_plotting_dict(ablated, clean) if scr else ref.scr.create_tpp_plotting_dict(ablated, clean)[0]
    torch.set_grad_enabled(True)
    torch.manual_seed(11)
    ours, our_clean, our_ablated, _ = sb.scr_tpp_task(pool(train, sae), pool(test, sae), sae.W_dec.detach(), d, scr,
                                                      ns, probes=probes)
    assert our_clean == pytest.approx(clean, abs=1e-6)
    assert our_ablated == {c: {n: pytest.approx(v, abs=1e-6) for n, v in a.items()} for c, a in ablated.items()}
    assert ours == pytest.approx(theirs, abs=1e-6)


class TL:
    """The three HookedTransformer calls SAEBench's core eval makes, on our Transformer."""

    def __init__(self, model, layer):
        self.m, self.layer = model, layer

    def _both(self, logits, toks):
        return logits, F.cross_entropy(logits[:, :-1].transpose(1, 2), toks[:, 1:], reduction="none")

    def __call__(self, toks, return_type="both", loss_per_token=True, **_):
        return self._both(self.m(toks), toks)

    def run_with_hooks(self, toks, return_type="both", fwd_hooks=(), loss_per_token=True, **_):
        fn = fwd_hooks[0][1]
        return self._both(self.m(toks, hooks={self.layer: lambda x: fn(x, None)}), toks)

    def run_with_cache(self, toks, names_filter=None, stop_at_layer=None, **_):
        return None, {names_filter[0]: self.m(toks, stop_at=self.layer)}


def test_core_matches_saebench(ref):
    """CE / KL scores, L0, cosine, SAEBench's explained variance and latent densities on the same token batches
    (BOS / EOS ignored and kept out of the reconstruction): within 1e-4."""
    cfg = ModelConfig.from_name("tiny-llama3")
    cfg.bos_token_id, cfg.eos_token_id = 1, 2
    model = Transformer(cfg).init_weights(0).requires_grad_(False)
    sae = topk_sae(cfg.d_model, 128, 8, 1)
    g = torch.Generator().manual_seed(0)
    batches = [torch.randint(3, cfg.vocab_size, (4, 32), generator=g) for _ in range(2)]
    for b in batches:
        b[:, 0], b[1, 10], b[2, 20] = 1, 2, 1
    it = iter(batches * 2)
    store = types.SimpleNamespace(get_batch_tokens=lambda n: next(it), reset_input_dataset=lambda: None)
    wrap = types.SimpleNamespace(encode=sae.encode, decode=sae.decode, W_dec=sae.W_dec, device=torch.device("cpu"),
                                 dtype=torch.float32, cfg=types.SimpleNamespace(
                                     hook_name="blocks.1.hook_resid_post", hook_head_index=None, hook_layer=1, d_sae=128))
    ign = {1, 2}
    with torch.no_grad():
        rec = ref.core.get_downstream_reconstruction_metrics(wrap, TL(model, 1), store, True, True, 2, 4, ign, True)
        var, feat = ref.core.get_sparsity_and_variance_metrics(wrap, TL(model, 1), store, 2, False, True, True, True,
                                                               4, {}, ign)
    ours = sb.core(model, sae, 1, batches, torch.tensor([1, 2]), contextlib.nullcontext())
    for a in ("ce_loss_without_sae", "ce_loss_with_sae", "ce_loss_with_ablation", "kl_div_with_sae",
              "kl_div_with_ablation", "ce_loss_score", "kl_div_score"):  # SAEBench's own names and definitions
        assert ours[a] == pytest.approx(rec[a], rel=1e-4, abs=1e-6), a
    for a in ("l0", "l1", "cossim", "explained_variance"):
        assert ours[a] == pytest.approx(var[a], rel=1e-4), a
    density = torch.tensor(feat["feature_density"])
    assert ours["dead"] == int((density == 0).sum()) and ours["dense"] == int((density > 0.1).sum())


def test_absorption_matches_saebench(ref):
    """Per-word absorption fraction and full-absorption flag against FeatureAbsorptionCalculator on the same
    activations (1e-5), and the split-latent rule against add_feature_splits_to_metrics_df."""
    import pandas as pd
    g = torch.Generator().manual_seed(0)
    d, m, words = 16, 48, [f"w{i}" for i in range(30)]
    x = torch.randn(len(words), d, generator=g) + 2 * F.one_hot(torch.tensor(0), d)
    sae = topk_sae(d, m, 6, 2)
    probe_dir = torch.randn(d, generator=g) + 3 * F.one_hot(torch.tensor(0), d)
    suffix = " has the first letter:"

    class Model:
        def run_with_cache(self, prompts, names_filter):
            acts = torch.zeros(len(prompts), 6, d)
            acts[:, -6] = torch.stack([x[words.index(p[:-len(suffix)].split("\n")[-1])] for p in prompts])
            return None, {names_filter[0]: acts}

        def to_tokens(self, p):
            return torch.zeros(1, 6)
    calc = ref.fac.FeatureAbsorptionCalculator(model=Model(), icl_word_list=words, max_icl_examples=2,
                                               base_template="{word}" + suffix, word_token_pos=-6)
    for main in ([0], [3, 7]):
        wrap = types.SimpleNamespace(encode=sae.encode, W_dec=sae.W_dec.detach(), device=torch.device("cpu"))
        r = calc.calculate_absorption(wrap, words, probe_dir, main, layer=0, show_progress=False)
        frac, full = sb.absorption_fractions(x, sae.encode(x), probe_dir, sae.W_dec.detach(), main)
        assert frac.tolist() == pytest.approx([w.absorption_fraction for w in r.word_results], abs=1e-5)
        assert full.tolist() == [w.is_full_absorption for w in r.word_results]
    f1s = [0.5, 0.6, 0.61, 0.9]
    feats = [[1], [1, 2], [1, 2, 3], [1, 2, 3, 4]]
    df = pd.DataFrame([{"letter": L, **{f"f1_sparse_sae_{k + 1}": f for k, f in enumerate(f1s)},
                        **{f"sparse_sae_k_{k + 1}_feats": torch.tensor(f).numpy() for k, f in enumerate(feats)}}
                       for L in sb.LETTERS])
    ref.ksp.add_feature_splits_to_metrics_df(df, max_k_value=4)
    assert df["split_feats"][0] == sb.split_features(f1s, feats) == [1, 2]


def test_multi_probe_matches_saebench(ref):
    """absorption's probes: SAEBench's train_multi_probe (Adam, pos-weighted BCE, exponential decay) and
    train_sparse_multi_probe (its L1 term) from the same seed on one full batch: the same weights to float rounding."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(300, 12, generator=g)
    y = F.one_hot(torch.randint(0, 5, (300,), generator=g), 5)
    x[:, :5] += 1.5 * y
    for l1 in (None, 0.01):
        torch.manual_seed(5)
        ours = sb.train_multi_probe(x, y, epochs=20, weight_decay=1e-4, l1=l1)
        torch.manual_seed(5)
        if l1 is None:
            theirs = ref.probing.train_multi_probe(x, y, num_epochs=20, weight_decay=1e-4, show_progress=False,
                                                   device=torch.device("cpu"))
        else:
            theirs = ref.ksp.train_sparse_multi_probe(x, y, torch.device("cpu"), l1_decay=l1, num_epochs=20,
                                                      l2_decay=1e-4, show_progress=False)
        torch.testing.assert_close(ours.weight, theirs.fc.weight, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(ours.bias, theirs.fc.bias, rtol=1e-4, atol=1e-5)
        assert (ours.weight - sb.train_multi_probe(x, y, epochs=20, lr=3e-2).weight).abs().max() > 1e-3


class HookedTL:
    """The HookedTransformer calls SAEBench's activation collection makes, on our Transformer (the hook after block
    `layer` is its resid_post)."""

    def __init__(self, model, layer, bos, eos, pad):
        self.m, self.layer = model, layer
        self.tokenizer = types.SimpleNamespace(bos_token_id=bos, eos_token_id=eos, pad_token_id=pad)

    def run_with_hooks(self, toks, stop_at_layer=None, fwd_hooks=(), **_):
        fwd_hooks[0][1](self.m(toks, stop_at=self.layer), None)


def test_pooled_features_match_saebench(ref):
    """saebench_data.pooled: the residual after the layer and its SAE latents averaged over the real tokens of each
    text, as SAEBench's get_llm_activations (BOS / EOS / pad zeroed) + create_meaned_model_activations /
    get_sae_meaned_activations compute them on the same right-padded tokens."""
    cfg = ModelConfig.from_name("tiny-llama3")
    cfg.bos_token_id, cfg.eos_token_id, cfg.init_std = 1, 2, 0.5  # streams that vary: TopK picks differ per token
    model = Transformer(cfg).init_weights(0).requires_grad_(False)
    torch.manual_seed(0)
    sae = SAE(cfg.d_model, 96, "topk", k=5, layer=1).requires_grad_(False)
    with torch.no_grad():
        sae.b_enc.normal_(0, 0.1)
        sae.b_dec.normal_(0, 0.1)  # zeroed positions get latents of their own: only the masked mean drops them
    g = torch.Generator().manual_seed(0)
    seqs = [[1] + torch.randint(3, 512, (n,), generator=g).tolist() + ([2] if n % 2 else []) for n in (5, 9, 3, 12, 7)]
    specials = torch.tensor([0, 1, 2])  # pad 0, BOS 1, EOS 2
    ours = sd.pooled(model, sae, 1, seqs, specials, contextlib.nullcontext(), batch=2)
    toks = torch.zeros(len(seqs), max(map(len, seqs)), dtype=torch.long)
    for i, q in enumerate(seqs):
        toks[i, :len(q)] = torch.tensor(q)
    acts = ref.ac.get_llm_activations(toks, HookedTL(model, 1, 1, 2, 0), 2, 1, "blocks.1.hook_resid_post",
                                      mask_bos_pad_eos_tokens=True, show_progress=False)
    resid = ref.ac.create_meaned_model_activations({"c": acts})["c"]
    wrap = types.SimpleNamespace(encode=sae.encode, dtype=torch.float32)
    lat = ref.ac.get_sae_meaned_activations({"c": acts}, wrap, 2)["c"]
    torch.testing.assert_close(ours[:, :cfg.d_model], resid, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ours[:, cfg.d_model:], lat, rtol=1e-5, atol=1e-6)
    assert (sae.encode(resid) - lat).abs().max() > 1e-3  # the mean of the latents, not the latents of the mean


def test_absorption_aggregates_as_saebench(ref, monkeypatch):
    """absorption(): per letter, the probe's true positives on test, their absorption fractions and full-absorption
    flags summed over words and divided by the true-positive count (SAEBench's _aggregate_results_df), averaged over
    the letters whose probe F1 (sklearn's f1_score) exceeds min_f1; split latents from the k-sparse F1s."""
    if ref.absorption_main is None:
        pytest.skip("sae_bench.evals.absorption.main does not import with the stubs")
    import pandas as pd
    from sklearn.metrics import f1_score
    g = torch.Generator().manual_seed(1)
    d, m, n_letters = 256, 512, 6
    W = 3 * torch.eye(d)[:n_letters]  # one direction per letter; 50 decaying Adam steps separate most of them

    def words(n):
        y = torch.randint(0, n_letters, (n,), generator=g)
        return W[y] + 0.1 * torch.randn(n, d, generator=g), y
    (xtr, ytr), (xte, yte) = words(240), words(120)
    sae = topk_sae(d, m, 6, 3)
    ftr, fte = sae.encode(xtr), sae.encode(xte)
    probes = []
    real = sb.train_multi_probe
    monkeypatch.setattr(sb, "train_multi_probe", lambda *a, **k: probes.append(real(*a, **k)) or probes[-1])
    torch.manual_seed(0)
    res = sb.absorption(xtr, ytr, xte, yte, ftr, fte, sae.W_dec.detach(), max_k=4, min_letters=3)
    probe = probes[0]
    rows, f1s = [], {}
    for li in sorted(set(ytr.tolist())):
        L = sb.LETTERS[li]
        pred = probe(xte)[:, li] > 0
        f1s[L] = f1_score((yte == li).numpy(), pred.numpy())
        assert res["per_letter"][L]["f1_probe"] == pytest.approx(f1s[L])
        tp = (yte == li) & pred
        split = res["per_letter"][L]["split_feats"]
        frac, full = sb.absorption_fractions(xte[tp], fte[tp], probe.weight[li], sae.W_dec.detach(), split)
        rows += [dict(letter=L, absorption_fraction=a, is_full_absorption=bool(b), num_probe_true_positives=int(tp.sum()),
                      split_feats=split) for a, b in zip(frac.tolist(), full.tolist())]
    agg = ref.absorption_main._aggregate_results_df(pd.DataFrame(rows))
    good = agg[[f1s[L] > 0.6 for L in agg["letter"]]]
    assert len(good) < len(f1s) or min(f1s.values()) > 0.6, f1s
    assert res["letters_evaluated"] == len(good) >= 3 and res["valid"]
    assert res["mean_absorption_fraction"] == pytest.approx(good["mean_absorption_fraction"].mean(), abs=1e-6)
    assert res["mean_full_absorption"] == pytest.approx(good["full_absorption_rate"].mean(), abs=1e-6)
    assert res["mean_num_split_features"] == pytest.approx(good["num_split_feats"].mean())


# -- sanity: metrics that must move the right way ----------------------------------------------------------------------


def test_planted_latent_probes_perfectly_random_sae_near_chance():
    g = torch.Generator().manual_seed(0)
    labels = {c: torch.full((80,), c) for c in range(3)}
    planted = {str(c): torch.cat([F.one_hot(y, 3).float(), torch.rand(len(y), 30, generator=g)], 1)
               for c, y in labels.items()}  # latent c == "is class c"
    noise = {str(c): torch.rand(80, 33, generator=g) for c in labels}  # latents unrelated to the label
    split = {c: v[:50] for c, v in planted.items()}, {c: v[50:] for c, v in planted.items()}
    torch.manual_seed(0)
    assert min(sb.probe_accuracies(*split, k=1).values()) > 0.99
    split = {c: v[:50] for c, v in noise.items()}, {c: v[50:] for c, v in noise.items()}
    torch.manual_seed(0)
    assert abs(sum(sb.probe_accuracies(*split, k=1).values()) / 3 - 0.5) < 0.15


def rotation_sae(d, mix: bool):
    """Exact-reconstruction SAE, latents relu(+-B x) for an orthonormal B: B = I (gender and profession on their own
    latents) or B mixing the two axes at 45 degrees (each latent fires on both concepts)."""
    B = torch.eye(d)
    if mix:
        B[:2, :2] = torch.tensor([[1.0, 1.0], [1.0, -1.0]]) / math.sqrt(2)
    sae = SAE(d, 2 * d, "topk", k=2 * d, layer=0, apply_b_dec_to_input=False)
    with torch.no_grad():
        sae.W_enc.copy_(torch.cat([B.T, -B.T], 1))
        sae.W_dec.copy_(torch.cat([B, -B], 0))
        sae.b_enc.zero_(), sae.b_dec.zero_()
    return sae.requires_grad_(False)


def test_scr_entangled_latent_scores_lower():
    """Residual dims: 0 gender, 1 profession, rest noise; the biased probe leans on gender. Ablating the
    gender-attributed latents debiases it only when the SAE keeps profession off those latents."""
    d, g = 6, torch.Generator().manual_seed(0)

    def quad(gender, prof, n):
        x = 0.3 * torch.randn(n, d, generator=g)
        x[:, 0] += 2 * gender - 1
        x[:, 1] += 2 * prof - 1
        return x

    def split(n):
        return {"male / female": torch.cat([quad(1, 1, n), quad(1, 0, n)]),
                "female_data_only": torch.cat([quad(0, 1, n), quad(0, 0, n)]),
                "professor / nurse": torch.cat([quad(1, 1, n), quad(0, 1, n)]),
                "nurse_data_only": torch.cat([quad(1, 0, n), quad(0, 0, n)]),
                "male_professor / female_nurse": quad(1, 1, 2 * n), "female_nurse_data_only": quad(0, 0, 2 * n)}
    probes = {}  # fixed probes: this checks the metric, not the probe trainer
    for key, w in (("male / female", [1.0, 0]), ("professor / nurse", [0, 1.0]),
                   ("male_professor / female_nurse", [1.0, 0.3])):
        probes[key] = sb.Probe(d)
        with torch.no_grad():
            probes[key].net.weight.zero_()
            probes[key].net.weight[0, :2] = torch.tensor(w)
            probes[key].net.bias.zero_()
    train, test = split(100), split(100)
    scores = {}
    for mix in (False, True):
        sae = rotation_sae(d, mix)
        feats = [{k: torch.cat([v, sae.encode(v)], 1) for k, v in s.items()} for s in (train, test)]
        torch.manual_seed(0)
        scores[mix] = sb.scr_tpp_task(*feats, sae.W_dec, d, True, ns=(2,), probes=probes)[0]["scr_metric_threshold_2"]
    assert scores[False] > 0.8 and scores[True] < scores[False] - 0.5, scores


def test_split_first_letter_latent_shows_absorption():
    """Letter direction e0. Clean SAE: one 's' latent fires on every s-word: absorption 0. Split SAE: on half the
    words a token-specific latent (e0 + e_j) fires instead of the 's' latent: those words count as absorbed."""
    d, n = 12, 10
    e = torch.eye(d)
    x = torch.stack([e[0] + e[1 + j % 8] for j in range(n)])
    W_dec = torch.stack([e[0]] + [(e[0] + e[1 + j]) / math.sqrt(2) for j in range(8)] + [e[1 + j] for j in range(8)])
    clean = torch.zeros(n, len(W_dec))
    clean[:, 0] = 1
    clean[torch.arange(n), 9 + torch.arange(n) % 8] = 1
    split = clean.clone()
    for j in range(0, n, 2):  # the token latent absorbs the letter
        split[j] = 0
        split[j, 1 + j % 8] = math.sqrt(2)
    frac_clean = sb.absorption_fractions(x, clean, e[0], W_dec, [0])[0]
    frac_split, full = sb.absorption_fractions(x, split, e[0], W_dec, [0])
    assert frac_clean.max() == 0
    assert frac_split.mean() > 0.4 and full[::2].all() and not full[1::2].any()


# -- evaluate: the whole run on tiny inputs ----------------------------------------------------------------------------


def tiny_run(monkeypatch, tmp_path):
    """evaluate()'s inputs made small: a tokenizer of character codes, two probing classes, the three SCR pairs, a few
    first-letter prompts and two core batches, all on the tiny random model."""
    import data
    from formats import tokenizer
    g = torch.Generator().manual_seed(0)
    tok = types.SimpleNamespace(bos_id=1, eos_id=2, pad_id=None, encode=lambda t: [3 + ord(c) % 500 for c in t])

    def texts(tag, n):
        return [tag + "".join(chr(97 + int(i)) for i in torch.randint(0, 26, (12,), generator=g)) for _ in range(n)]

    def split(classes, n):
        return {c: texts(c[:3], n) for c in classes}
    probing = {"t": (split(["0", "1"], 16), split(["0", "1"], 8))}
    scr_classes = [*sd.SCR_KEYS, *sd.SCR_KEYS.values()]
    scr = {"s": (split(scr_classes, 16), split(scr_classes, 8))}
    letters = [([1] + torch.randint(3, 500, (8,), generator=g).tolist(), int(i))
               for i in torch.randint(0, 26, (40,), generator=g)]
    monkeypatch.setattr(sd, "tasks", lambda offline, seed: (probing, probing, scr))
    monkeypatch.setattr(sd, "first_letter_prompts", lambda tok, seed, max_words=None: (letters[:30], letters[30:], -3))
    monkeypatch.setattr(sd, "core_batches", lambda d, device: [torch.randint(3, 500, (2, 16), generator=g)
                                                               for _ in range(2)])
    monkeypatch.setattr(data, "load_meta", lambda d: {"source": "stdlib", "tokenizer": "chars"})
    monkeypatch.setattr(tokenizer, "load_tokenizer", lambda name: tok)
    cfg = types.SimpleNamespace(data="data", tokenizer=None, model="m", out=str(tmp_path), plots=False,
                                saebench_words=None)
    return cfg


def test_evaluate_runs_base_and_adapted_settings(monkeypatch, tmp_path):
    """Base = adapters off, adapted = adapters on (the reference below merges them: in fp32 the same model). A fresh
    adapter (B = 0) changes nothing: both settings report the same numbers; a trained one changes the residual, and
    each setting's core metrics are those of sb.core on that model."""
    from lora import apply_lora, lora_modules, merged
    cfg = tiny_run(monkeypatch, tmp_path)
    mcfg = ModelConfig.from_name("tiny-llama3")
    mcfg.bos_token_id, mcfg.eos_token_id, mcfg.init_std = 1, 2, 0.3
    model = Transformer(mcfg).init_weights(0).requires_grad_(False)
    apply_lora(model, 4, 8.0, 0.0, None)
    model.eval()
    sae = topk_sae(64, 128, 4, 0)
    autocast_ctx = contextlib.nullcontext()
    res = sb.evaluate(model, [(1, sae)], cfg, torch.device("cpu"), autocast_ctx, seed=1)
    base, adapted = res["settings"]["base"], res["settings"]["adapted"]
    assert set(base) == {"core", "sparse_probing", "tpp", "scr", "absorption", "autointerp"}
    for key in ("core", "sparse_probing", "tpp", "scr"):
        assert adapted[key] == pytest.approx(base[key], nan_ok=True), key
    assert (tmp_path / "saebench.json").is_file() and (tmp_path / "saebench.md").is_file()
    with torch.no_grad():
        for m in lora_modules(model).values():
            m.lora_B.normal_(0, 0.5)
    batches = sd.core_batches(None, None)  # the stub's two batches (the run drew its own: compare on the same ones)
    monkeypatch.setattr(sd, "core_batches", lambda d, device: batches)
    res = sb.evaluate(model, [(1, sae)], cfg, torch.device("cpu"), autocast_ctx, seed=1)
    specials = torch.tensor([1, 2])
    with torch.no_grad():
        from lora import adapters_disabled
        with adapters_disabled(model):
            want_base = sb.core(model, sae, 1, batches, specials, autocast_ctx)
        with merged(model):
            want_adapted = sb.core(model, sae, 1, batches, specials, autocast_ctx)
    assert res["settings"]["base"]["core"] == pytest.approx(want_base)
    assert res["settings"]["adapted"]["core"] == pytest.approx(want_adapted, rel=1e-5)
    assert res["settings"]["adapted"]["core"]["ce_loss_without_sae"] != pytest.approx(want_base["ce_loss_without_sae"])


def test_first_letter_prompts_cap_the_vocabulary(monkeypatch):
    """--saebench-words N: the prompts of the first N words of SAEBench's shuffled vocabulary, split 80/20 as all of
    them are; none: every letter-only token (a word-level tokenizer here: one id per whitespace-separated piece)."""
    words = [a + b for a in "abcdefghij" for b in "klmnopqrst"]
    monkeypatch.setattr(sd, "alpha_tokens", lambda tok: [(i + 1, w) for i, w in enumerate(words)])

    class Tok:
        bos_id, ids = 0, {w: i + 1 for i, w in enumerate(words)}

        def encode(self, s):
            return [self.ids.setdefault(p, 1000 + len(self.ids)) for p in s.split()]

    name = {i + 1: w for i, w in enumerate(words)}
    full_train, full_test, pos = sd.first_letter_prompts(Tok(), 42)
    assert (len(full_train), len(full_test)) == (80, 20)
    train, test, _ = sd.first_letter_prompts(Tok(), 42, max_words=20)
    assert (len(train), len(test)) == (16, 4)
    used = [{name[ids[pos]] for ids, _ in rows} for rows in (train, test)]
    in_context = {name[i] for ids, _ in train + test for i in ids if i in name}
    assert in_context == used[0] | used[1]  # the examples come from the capped words only
    assert all(sd.LETTERS[y] == name[ids[pos]][0] for ids, y in train + test)
