"""tests/need.py: a missing reference package skips a test locally and fails it under CI."""
import pytest

from tests.need import need


def test_present_module_is_returned():
    import math
    assert need("math") is math


def test_missing_reference_skips_locally_and_fails_under_ci(monkeypatch):
    monkeypatch.delenv("CI", raising=False)
    with pytest.raises(pytest.skip.Exception, match="no_such_reference_pkg"):
        need("no_such_reference_pkg")
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="CI is set"):
        need("no_such_reference_pkg")
