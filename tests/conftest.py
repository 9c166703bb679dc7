"""Test-wide settings and helpers.

* One torch thread: small models run no slower and a core stays free.
* ``require_system(what, available)``: tests that need a Debian package (Prometheus, fonts,
  Fashion-MNIST) skip with a reason on a machine without it, and fail in CI, where
  ``META_AGENT_REQUIRE_SYSTEM=1`` says the package must be there.
"""

import os

import pytest
import torch

torch.set_num_threads(1)


def require_system(what: str, available: bool) -> None:
    """Skip (or, in CI, fail) when the system part ``what`` is missing."""
    if available:
        return
    message = f"{what} is not installed (see README: apt-get install ...)"
    if os.environ.get("META_AGENT_REQUIRE_SYSTEM") == "1":
        pytest.fail(message + "; META_AGENT_REQUIRE_SYSTEM=1 requires it")
    pytest.skip(message)
