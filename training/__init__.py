"""Training-only pieces of the scripts: what a reader who splices an SAE never runs."""
