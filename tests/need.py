"""A reference package a test compares with (requirements-dev.txt, sae-bench). Missing, the test is skipped on a
developer's machine and FAILS under CI (env CI set): a broken install must not turn the comparisons into skips."""
import importlib
import os

import pytest


def need(name: str):
    """The module `name`, imported; else pytest.skip, or pytest.fail when CI is set."""
    try:
        return importlib.import_module(name)
    except ImportError as e:
        msg = (f"{name} is not importable ({e}); it is a test reference: pip install -r requirements-dev.txt "
               f"(sae_bench: pip install --no-deps sae-bench==0.6.0)")
        if os.environ.get("CI"):
            pytest.fail(msg + " [CI is set: a missing reference fails the run]", pytrace=False)
        pytest.skip(msg)
