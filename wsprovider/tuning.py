"""Process-wide tuning for a process whose job is to run wsprovider.

The twistd plugin applies it; an application embedding the provider may call
``tune_gc()`` itself (it changes the whole interpreter's garbage collector).

CPython's default cyclic-GC thresholds (700, 10, 10) make a server that holds many
connections walk its whole heap over and over while connections arrive: with 10,000
sessions opening, full collections took about a quarter of the server's CPU (1.2-1.4 s
of 5.5 s), and they show up as round-trip outliers. Reference counting still frees
almost everything at once; the thresholds only decide how often cycles are looked for.
"""

from __future__ import annotations

import gc

GC_THRESHOLDS = (50000, 20, 10)


def tune_gc(thresholds=GC_THRESHOLDS, freeze: bool = True):
    """Collect once, move what exists now (modules, classes, config) out of the collector's
    sight with ``gc.freeze()``, and raise the thresholds. Returns the previous thresholds."""
    previous = gc.get_threshold()
    if freeze:
        gc.collect()
        gc.freeze()
    gc.set_threshold(*thresholds)
    return previous
