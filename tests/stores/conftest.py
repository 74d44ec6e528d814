"""Fixtures for store tests: ``store_factory`` writes small real stores (``helpers.write_store``)."""
from __future__ import annotations

import pytest

from .helpers import write_store


@pytest.fixture
def store_factory():
    return write_store
