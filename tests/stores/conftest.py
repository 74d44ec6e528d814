"""Fixtures for store tests: ``store_factory`` writes small real stores (``helpers.write_store``);
``store_copy`` is a fresh copy of one small complete store (``damage.make_store``) for a test to damage."""
from __future__ import annotations

import shutil

import pytest

from .damage import make_store
from .helpers import write_store


@pytest.fixture
def store_factory():
    return write_store


@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
    return make_store(tmp_path_factory.mktemp("pristine") / "store")


@pytest.fixture
def store_copy(pristine, tmp_path):
    path = tmp_path / "store"
    shutil.copytree(pristine, path)
    return path
