"""Resolvent attention and the methods behind it, one module per method: :mod:`.dense`,
:mod:`.squaring`, :mod:`.band`, :mod:`.dag`, :mod:`.grid`, :mod:`.line`, :mod:`.neumann`, :mod:`.iterative`;
what they share in :mod:`.common`, the compiled extension in :mod:`._extension`, the test oracles in :mod:`.reference`,
and the choice of method in :mod:`.resolvent`. :mod:`.triton_attention` and :mod:`.triton_grid` hold the Triton
kernels of the squaring and grid paths (importable without Triton; their kernels need it). :mod:`.block` fuses
the elementwise parts of the block around the mixer (local convolution with SiLU, gated RMSNorm) on CPU."""
from . import band, block, common, dag, dense, grid, iterative, line, neumann, reference, squaring, triton_grid
from ._extension import HAS_EXTENSION
from .band import BandSchedule, band_resolvent_attention, band_schedule
from .common import CsrOperator, edge_dot, spmm
from .dag import dag_attention, dag_solve
from .resolvent import (DENSE_MAX_NODES, METHODS, SQUARING_MAX_NODES, GraphTopology, choose_method,
                        resolvent_attention)

__all__ = [
    "resolvent_attention",
    "GraphTopology",
    "choose_method",
    "METHODS",
    "DENSE_MAX_NODES",
    "SQUARING_MAX_NODES",
    "spmm",
    "dag_solve",
    "dag_attention",
    "band_schedule",
    "band_resolvent_attention",
    "BandSchedule",
    "edge_dot",
    "CsrOperator",
    "HAS_EXTENSION",
    "reference",
    "block",
    "common",
    "dense",
    "squaring",
    "band",
    "dag",
    "grid",
    "triton_grid",
    "line",
    "neumann",
    "iterative",
]
