"""Fixtures shared by the test packages."""
from __future__ import annotations

import shutil

import pytest


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory):
    """One fresh model cache for the whole session (loader and tokenizer tests share it), so the
    default model is converted once and the tests also pass on a machine with no cache."""
    path = tmp_path_factory.getbasetemp() / "tandem-cache"
    mp = pytest.MonkeyPatch()
    mp.setenv("TANDEM_CACHE_DIR", str(path))
    mp.setenv("TANDEM_NO_PROGRESS", "1")
    yield path
    mp.undo()
    shutil.rmtree(path, ignore_errors=True)   # 0.5 GB; pytest would keep three sessions of it
