"""The presets a script runs with when no --model is given (the embedded tiny model), one file each, read as plain
assignments (nanoGPT's config/*.py): `python adapt.py` runs AdaptConfig's defaults (the authors' run) with
config/adapt_tiny.py's values in place of the flags not typed; the first log line names the file."""
from __future__ import annotations

import os

HERE = os.path.dirname(os.path.abspath(__file__))


def path(script: str) -> str:
    """The preset file of `script` (adapt, train_sae, train_e2e, eval), relative to the project root."""
    return os.path.join("config", f"{script}_tiny.py")


def preset(script: str) -> dict:
    """{field: value} of the file's assignments, in file order (names starting with _ are the file's own)."""
    scope: dict = {}
    with open(os.path.join(HERE, f"{script}_tiny.py")) as f:
        exec(compile(f.read(), path(script), "exec"), scope)
    return {k: v for k, v in scope.items() if not k.startswith("_")}
