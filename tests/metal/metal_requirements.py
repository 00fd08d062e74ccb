"""Prerequisites of the Metal tests: on CI (CI=true) a missing tool fails
the test that needs it; elsewhere the test skips with the reason."""

import os

import pytest

IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")


def require(condition: bool, reason: str) -> None:
    if condition:
        return
    if IN_CI:
        pytest.fail(reason + " (required on CI)")
    pytest.skip(reason)
