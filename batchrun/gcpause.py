"""The cyclic garbage collector paused while a large structure without reference cycles is built.

Reading 100,000 ledger rows or manifest jobs allocates millions of small objects and no cycles; left on,
the collector rescans the growing heap again and again (a third or more of such a read, measured with
cProfile at 100,000 jobs). `load_manifest` and `Ledger.all` pause it the same way.
"""

from __future__ import annotations

import gc
from collections.abc import Iterator
from contextlib import contextmanager


@contextmanager
def paused() -> Iterator[None]:
    """Disable the cyclic collector for the block, and enable it again after only if it was enabled."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()
