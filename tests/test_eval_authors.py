"""eval.py's "authors" formulations (distances_authors, steering_authors) against a few lines written directly from the
authors' code (matchten/LoRA-Models-for-SAEs), on the tiny trained Llama-3 of test_eval.py; and where they differ from
ours."""
import json
import random

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from evals import confidence
from sae import SAE
from tests.tol import approx_scaled
from tests.test_eval import SAE_LAYER, load, run, sentence, val_batches, world, write_jsonl  # noqa: F401, F811 (world: the fixture)


# ----------------------------------------------------------------------------------------------------------------------
# activation distances


def authors_activation_metrics(base_model, model, sae, input_tensor):
    """interp_analysis/activation_distances.py:62-128 (compute_sae_activation_metrics) on one sequence, with our
    model's hooks in place of forward hooks: every layer's output recorded; the SAE hook registered first at
    SAE_LAYER (so the recorder there sees the reconstruction), splicing every position."""
    n_layers = base_model.cfg.n_layer
    original_activations, sae_activations = [], []

    def get_activation_hook(activation_list):
        def hook(x):
            activation_list.append(x.detach())
            return x
        return hook

    def sae_hook(x):
        flat_output = x.reshape(-1, x.shape[-1])
        return sae(flat_output).reshape(x.shape).to(x.dtype)

    with torch.no_grad():
        base_model(input_tensor, hooks={i: get_activation_hook(original_activations) for i in range(n_layers)})
        hooks = {i: get_activation_hook(sae_activations) for i in range(n_layers)}
        record = hooks[SAE_LAYER]
        hooks[SAE_LAYER] = lambda x: record(sae_hook(x))
        model(input_tensor, hooks=hooks)
    metrics = []
    for orig_act, sae_act in zip(original_activations, sae_activations):
        l2_dist = torch.norm(orig_act - sae_act, p=2, dim=-1).mean().item()
        orig_flat = orig_act.reshape(-1, orig_act.size(-1))
        sae_flat = sae_act.reshape(-1, sae_act.size(-1))
        cos_sim = torch.nn.functional.cosine_similarity(orig_flat, sae_flat, dim=1).mean().item()
        metrics.append((l2_dist, cos_sim))
    distances, cosine_sims = zip(*metrics)
    return list(distances), list(cosine_sims)


def test_distances_authors_equal_activation_distances_py(world):
    """Their run splices their sparsify SAE at every position: --sae-positions all. Reference: activation_distances.py
    :62-128 per sequence (base model = no adapter; "peft" model = adapters on, unmerged), then plot_metrics (197-216):
    change = peft - base per sequence, 90% CI mean +- 1.645 sd(ddof=1) / sqrt(n)."""
    _, saved, _ = run(world, "--sae", world["sae"]["crude"], "--adapter", world["adapter"]["rand"],
                      "--data", world["data"], "--sae-positions", "all", out="dist_authors")
    g = saved["groups"][0]
    base_model, peft_model = load(world), load(world, "rand").eval()
    sae = SAE.from_pretrained(world["sae"]["crude"])
    ref = {"base": {"distances": [], "cosine_sims": []}, "peft": {"distances": [], "cosine_sims": []}}
    for idx in val_batches(world):
        for i in range(len(idx)):  # BATCH_SIZE = 1
            for model_type, model in (("base", base_model), ("peft", peft_model)):
                d, c = authors_activation_metrics(base_model, model, sae, idx[i:i + 1])
                ref[model_type]["distances"].append(d)
                ref[model_type]["cosine_sims"].append(c)
    ref = {m: {k: np.array(v) for k, v in r.items()} for m, r in ref.items()}
    rows = g["distances_authors"]["layers"]
    assert g["distances_authors"]["formulation"] == "authors"
    assert [r["layer"] for r in rows] == list(range(SAE_LAYER, 4))
    for r in rows:
        layer = r["layer"]
        for name, key in (("l2", "distances"), ("cos", "cosine_sims")):
            base, peft = ref["base"][key][:, layer], ref["peft"][key][:, layer]
            assert r[f"{name}_sae"]["mean"] == pytest.approx(base.mean(), rel=1e-5, abs=1e-6)
            assert r[f"{name}_sae_lora"]["mean"] == pytest.approx(peft.mean(), rel=1e-5, abs=1e-6)
            diff = peft - base
            se = np.std(diff, ddof=1) / np.sqrt(len(diff))
            # a change is a difference of two fp32 distances: it is rounded on their scale (an L2 of hundreds is
            # resolved to ~3e-5), not on its own
            scale = 1e-6 * max(np.abs(base).max(), np.abs(peft).max())
            assert r[f"{name}_change"]["mean"] == pytest.approx(diff.mean(), abs=scale)
            assert r[f"{name}_change"]["hi"] == pytest.approx(diff.mean() + 1.645 * se, abs=scale)
            assert r[f"{name}_change"]["n"] == 16
    assert rows[0]["l2_sae"]["mean"] > 0.1 and rows[-1]["l2_change"]["mean"] != 0
    # every position spliced: our average over the replaced positions is the same average
    for ours, theirs in zip(g["distances"]["layers"], rows):
        assert ours == theirs


def test_distances_ours_and_authors_differ_by_the_unspliced_bos(world):
    """SAELens-format SAEs are spliced everywhere but BOS (--sae-positions auto). At the SAE layer the BOS positions
    keep their activation (distance 0, cosine 1): the authors' mean over all positions counts them, ours does not."""
    _, saved, _ = run(world, "--sae", world["sae"]["crude"], "--data", world["data"], out="dist_bos")
    g = saved["groups"][0]
    model, sae, bos = load(world), SAE.from_pretrained(world["sae"]["crude"]), world["tok"].bos_id
    per_seq = {"all": {"l2": [], "cos": []}, "non_bos": {"l2": [], "cos": []}}
    with torch.no_grad():
        for idx in val_batches(world):
            x = model(idx, stop_at=SAE_LAYER)
            y = torch.where((idx == bos)[..., None], x, sae(x.reshape(-1, x.shape[-1])).view_as(x))
            for name, v in (("l2", (x - y).norm(dim=-1)), ("cos", F.cosine_similarity(x, y, dim=-1))):
                for i in range(len(idx)):
                    per_seq["all"][name].append(v[i].mean().item())
                    per_seq["non_bos"][name].append(v[i][idx[i] != bos].mean().item())
    assert (val_batches(world)[0][:, 0] == bos).all()  # every window starts with BOS
    ours, theirs = g["distances"]["layers"][0], g["distances_authors"]["layers"][0]
    for name in ("l2", "cos"):
        assert ours[f"{name}_sae"]["mean"] == pytest.approx(np.mean(per_seq["non_bos"][name]), rel=1e-5)
        assert theirs[f"{name}_sae"]["mean"] == pytest.approx(np.mean(per_seq["all"][name]), rel=1e-5)
    assert theirs["l2_sae"]["mean"] < 0.99 * ours["l2_sae"]["mean"]  # BOS (distance 0) pulls the authors' mean down
    assert theirs["cos_sae"]["mean"] > ours["cos_sae"]["mean"]
    md = open(world["root"] / "dist_bos" / "eval.md").read()
    assert "| (none) | ours | 1 (+0) |" in md and "| (none) | authors | 1 (+0) |" in md


# ----------------------------------------------------------------------------------------------------------------------
# steering


def authors_LL(model, token_ids, hooks=None):
    """run_steering.py:56-70 (LL): the tokenizer puts BOS first; log_probs[1:] gathered at token_ids[1:]."""
    with torch.no_grad():
        logits = model(token_ids[None], hooks)
        log_probs = torch.nn.functional.log_softmax(logits, dim=-1)
        log_probs = log_probs.squeeze(0)
        token_log_probs = log_probs[1:].gather(dim=-1, index=token_ids[1:].unsqueeze(-1)).squeeze(-1)
        return token_log_probs.mean().item()


def normalize_likelihoods(base_LL, intervention_LL):
    """run_steering.py:72-82, verbatim."""
    base_tensor = torch.tensor(base_LL)
    intervention_tensor = torch.tensor(intervention_LL)
    shift = base_tensor.min()
    scale = base_tensor.max() - base_tensor.min()
    base_tensor = 100 * (base_tensor - shift) / scale
    intervention_tensor = 100 * (intervention_tensor - shift) / scale
    return base_tensor.tolist(), intervention_tensor.tolist()


def authors_main(model, ds, sae_feature, alpha):
    """run_steering.py:93-211 (main) with PERCENTILE = 1: LLs unsteered and with the hook of 127-131 at the SAE layer,
    normalised (162), sorted by normalised unsteered LL (190); returns (base_LL, intervention_LL)."""
    base_LL = [authors_LL(model, ids) for ids in ds]

    def intervention_hook(x):
        parallel_comp = torch.sum(x * sae_feature, dim=-1, keepdim=True)
        return x + alpha * parallel_comp * sae_feature
    intervention_LL = [authors_LL(model, ids, {SAE_LAYER: intervention_hook}) for ids in ds]
    base_LL, intervention_LL = normalize_likelihoods(base_LL, intervention_LL)
    LLs = sorted(zip(base_LL, intervention_LL), key=lambda x: x[0])
    return tuple(zip(*LLs))


def stat_eval(base_pos_diff, peft_pos_diff, base_neg_diff, peft_neg_diff):
    """run_steering.py:216-234."""
    import scipy.stats
    pos_diff = np.array(peft_pos_diff) - np.array(base_pos_diff)
    neg_diff = np.array(peft_neg_diff) - np.array(base_neg_diff)
    pos_ci = scipy.stats.t.interval(0.90, len(pos_diff) - 1, loc=np.mean(pos_diff), scale=scipy.stats.sem(pos_diff))
    neg_ci = scipy.stats.t.interval(0.90, len(neg_diff) - 1, loc=np.mean(neg_diff), scale=scipy.stats.sem(neg_diff))
    return pos_ci, neg_ci


def test_steering_authors_equal_run_steering_py(world, tmp_path):
    """run_steering.py end to end: LL off by one (56-70), raw decoder row (107, 127-131), normalisation per dataset
    (72-82, 162), rank order (190), one alpha for both models (341-348), pooled negatives (364-367), t CI (216-234).
    The latent's decoder row is scaled by 2, so their --alpha is ours / 4."""
    rng = random.Random(5)
    sae = SAE.from_pretrained(world["sae"]["crude"])
    with torch.no_grad():
        sae.W_dec[3] *= 2 / sae.W_dec[3].norm()
    sae.save(str(tmp_path / "scaled"))
    texts = {"pos": [sentence(rng) for _ in range(6)], "law": ["zq xv kj wp", "1234 5678 90", "QQQ RRR SSS"],
             "arabic": ["ok, fine.", "the the cat", "sees sees big", "9 9 9 red"],
             "val": ["pp ww zz yy", "the the the", "9 9 9 9"]}
    paths = {k: write_jsonl(tmp_path / f"{k}.jsonl", t) for k, t in texts.items()}
    paths["arabic"] = str(tmp_path / "arabic.json")  # the authors' dataset format
    with open(paths["arabic"], "w") as f:
        json.dump({"examples": texts["arabic"]}, f)
    _, saved, _ = run(world, "--sae", str(tmp_path / "scaled"), "--adapter", world["adapter"]["rand"],
                      "--latent", "3", "--steering-pos", paths["pos"], "--steering-neg", paths["law"],
                      "--steering-neg", paths["arabic"], "--steering-neg-val", paths["val"],
                      "--alphas", "0,-0.5,3,20", out="steer_authors")
    base, lora = saved["steering_authors"]["base"], saved["groups"][0]["steering_authors"]
    assert "position t scored on token t" in saved["steering_authors"]["formulation"]
    assert lora["alpha"] == base["alpha"] and base["decoder_norm"] == pytest.approx(2.0)

    tok = world["tok"]
    ds = {k: [torch.tensor([tok.bos_id] + tok.encode(t)) for t in ts] for k, ts in texts.items()}
    sae_feature = sae.W_dec[3].detach().clone()
    base_model, peft_model = load(world), load(world, "rand").eval()
    # alpha: the base model's best on positives vs validation negatives in this formulation, over the grid
    objective = {}
    for a in (0, -0.5, 3, 20):
        pos, pos_i = authors_main(base_model, ds["pos"], sae_feature, a / 4)
        val, val_i = authors_main(base_model, ds["val"], sae_feature, a / 4)
        objective[a] = np.mean(np.subtract(pos_i, pos)) - np.mean(np.subtract(val_i, val))
    assert base["alpha"] == max(objective, key=objective.get) and base["alpha_run_steering"] == base["alpha"] / 4
    alpha = base["alpha_run_steering"]

    diffs = {}
    for model_type, model in (("base", base_model), ("peft", peft_model)):
        pos_LL, pos_intervention_LL = authors_main(model, ds["pos"], sae_feature, alpha)
        diffs[model_type, "pos"] = np.subtract(pos_intervention_LL, pos_LL)  # get_diffs, 307-325
        for name in ("law", "arabic"):
            neg_LL, neg_intervention_LL = authors_main(model, ds[name], sae_feature, alpha)
            diffs[model_type, name] = np.subtract(neg_intervention_LL, neg_LL)
    assert base["loglik_unsteered"]["pos"] == pytest.approx([authors_LL(base_model, ids) for ids in ds["pos"]],
                                                            rel=1e-5)
    # normalised scores, 100 (LL - min) / spread: every one carries the fp32 rounding of the log-likelihoods blown up
    # by 100 / spread, which the largest of a list bounds
    for model_type, res in (("base", base), ("peft", lora)):
        assert res["pos"] == approx_scaled(diffs[model_type, "pos"].tolist(), 2e-5)
        for name in ("law", "arabic"):
            assert res["neg"][name] == approx_scaled(diffs[model_type, name].tolist(), 2e-5)
    pos_ci, neg_ci = stat_eval(diffs["base", "pos"], diffs["peft", "pos"],
                               np.concatenate([diffs["base", "law"], diffs["base", "arabic"]]),
                               np.concatenate([diffs["peft", "law"], diffs["peft", "arabic"]]))
    c = saved["groups"][0]["steering_authors_compare"]
    scale = {k: max(np.abs(diffs[m, k]).max() for m in ("base", "peft")) for k in ("pos", "law", "arabic")}
    assert (c["POSITIVE"]["lo"], c["POSITIVE"]["hi"]) == pytest.approx(pos_ci, abs=2e-5 * scale["pos"])
    assert (c["NEGATIVE"]["lo"], c["NEGATIVE"]["hi"]) == pytest.approx(
        neg_ci, abs=2e-5 * max(scale["law"], scale["arabic"]))
    assert c["NEGATIVE"]["n"] == 7 and set(c["NEGATIVE_by_dataset"]) == {"law", "arabic"}
    md = open(world["root"] / "steer_authors" / "eval.md").read()
    assert "authors (as run_steering.py computes it: position t scored on token t)" in md and "| rand: law |" in md


def test_steering_formulations_differ_where_they_should(world):
    """Ours scores position t-1 on token t, the authors' position t on token t (same forward); ours normalises all
    negative files together, theirs each on its own; ours pairs base and LoRA texts by identity, theirs by rank (same
    mean difference, another CI)."""
    rng = random.Random(7)
    r = world["root"]
    pos = write_jsonl(r / "pos7.jsonl", [sentence(rng) for _ in range(6)])
    negs = [write_jsonl(r / "negA.jsonl", ["zq xv kj wp", "QQQ RRR SSS", "the the cat"]),
            write_jsonl(r / "negB.jsonl", ["1234 5678 90", "ok, fine.", "9 9 9 red"])]
    _, saved, _ = run(world, "--sae", world["sae"]["crude"], "--adapter", world["adapter"]["rand"], "--latent", "3",
                      "--steering-pos", pos, "--steering-neg", negs[0], "--steering-neg", negs[1], "--alpha", "3",
                      out="steer_differ")
    ours, theirs = saved["groups"][0]["steering"], saved["groups"][0]["steering_authors"]
    assert ours["alpha"] == theirs["alpha"] == 3  # a fixed alpha: the same in both
    model, tok = load(world, "rand").eval(), world["tok"]
    ids = torch.tensor([tok.bos_id] + tok.encode(json.loads(open(pos).readline())["text"]))
    with torch.no_grad():
        from lora import merged
        with merged(model):
            lp = F.log_softmax(model(ids[None])[0], -1)
    next_token = lp[:-1].gather(1, ids[1:, None]).mean().item()
    same_token = lp[1:].gather(1, ids[1:, None]).mean().item()
    assert ours["loglik_unsteered"]["pos"][0] == pytest.approx(next_token, rel=1e-5)
    assert theirs["loglik_unsteered"]["pos"][0] == pytest.approx(same_token, rel=1e-5)
    assert abs(next_token - same_token) > 0.1
    # negatives: ours over both files on one scale, theirs per file (6 texts either way)
    assert len(ours["neg"]) == 6 and [len(v) for v in theirs["neg"].values()] == [3, 3]
    u, s = ({k: np.array(theirs[f"loglik_{w}"][f"neg/{k}"]) for k in ("negA", "negB")}
            for w in ("unsteered", "steered"))
    pooled = np.ptp(np.concatenate(list(u.values())))
    for k in u:
        change = 100 * (s[k] - u[k])[np.argsort(u[k])]
        assert theirs["neg"][k] == pytest.approx((change / np.ptp(u[k])).tolist(), abs=1e-6)
    assert np.ptp(u["negB"]) < 0.9 * pooled  # so for negB the per-dataset scale is not the pooled one
    assert not np.allclose(theirs["neg"]["negB"], 100 * (s["negB"] - u["negB"])[np.argsort(u["negB"])] / pooled)
    c, base = saved["groups"][0]["steering_authors_compare"], saved["steering_authors"]["base"]
    assert c["POSITIVE"]["mean"] == pytest.approx(np.mean(theirs["pos"]) - np.mean(base["pos"]))
    assert c["POSITIVE"]["dist"] == "t" and "dist" not in saved["groups"][0]["steering_compare"]["POSITIVE"]


def test_t_quantile_is_scipy_t_ppf():
    import scipy.stats as stats
    for df in (1, 2, 3, 4, 7, 10, 99, 499, 3000):
        assert confidence.t_quantile(0.9, df) == pytest.approx(stats.t.ppf(0.95, df), rel=1e-12)
    assert confidence.mean_ci([1.0, 2.0, 4.0], t=True)["hi"] == pytest.approx(
        stats.t.interval(0.9, 2, loc=7 / 3, scale=stats.sem([1.0, 2.0, 4.0]))[1], rel=1e-12)
