"""``--threads`` of the examples, applied before torch starts (this module must not import torch).

With torch 2.13 (MKL), calling ``torch.set_num_threads`` and then running at more than one thread
makes batched LU factorizations (``torch.linalg.inv``, used by Chimera's dense path) return invalid
pivots, so the examples set ``OMP_NUM_THREADS`` and ``MKL_NUM_THREADS`` instead, which torch reads
when it starts: each example calls :func:`pin_threads` before its ``import torch``.
"""
import os
from typing import List, Optional


def threads_from_argv(argv: List[str], default: Optional[int]) -> Optional[int]:
    """``--threads`` read before argparse runs (a malformed value is left for argparse to report)."""
    for i, arg in enumerate(argv):
        value = arg.split("=", 1)[1] if arg.startswith("--threads=") else \
            argv[i + 1] if arg == "--threads" and i + 1 < len(argv) else None
        if value is not None:
            return int(value) if value.lstrip("-").isdigit() else default
    return default


def pin_threads(argv: List[str], default: Optional[int]):
    """Put ``--threads`` (or ``default``) in the environment; 0 or None keep the environment's."""
    threads = threads_from_argv(argv, default)
    if threads is not None and threads > 0:
        os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = str(threads)
