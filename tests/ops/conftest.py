"""The ``impl`` fixture of the op tests: forces one implementation with WORM_BACKEND."""
import pytest

from worm import ops
from impl_cases import DEV


@pytest.fixture
def impl(request, monkeypatch):
    monkeypatch.setenv("WORM_BACKEND", request.param)
    assert ops.backend(DEV) == request.param
    return request.param
