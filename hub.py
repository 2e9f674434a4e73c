"""TEMPORARY placeholder until the hub branch lands."""
DEFAULT_SAES = {"google/gemma-2-2b": "google/gemma-scope-2b-pt-res-canonical/layer_{layer}/width_16k/canonical",
                "google/gemma-2-9b": "google/gemma-scope-9b-pt-res-canonical/layer_{layer}/width_16k/canonical"}


def default_sae(model_id, layer):
    t = DEFAULT_SAES.get(model_id)
    return t.format(layer=layer) if t else None
