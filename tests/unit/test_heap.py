"""services/common/heap.py: the start-up heap frozen, full collections made rarer."""
from __future__ import annotations

import gc

from services.common import heap


def test_freeze_startup_heap_freezes_and_raises_the_full_threshold():
    before = gc.get_threshold()
    try:
        frozen = heap.freeze_startup_heap()
        assert frozen == gc.get_freeze_count() > 0
        young, middle, full = gc.get_threshold()
        assert (young, middle) == before[:2] and full == heap.FULL_EVERY
    finally:
        gc.unfreeze()
        gc.set_threshold(*before)
