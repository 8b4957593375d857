"""Resolvent attention and the kernels behind it."""
from . import reference
from ._kernels import (HAS_EXTENSION, BandSchedule, CsrOperator, band_resolvent_attention, band_schedule,
                       dag_attention, dag_solve, edge_dot, spmm)
from .resolvent import DENSE_MAX_NODES, METHODS, GraphTopology, choose_method, resolvent_attention

__all__ = [
    "resolvent_attention",
    "GraphTopology",
    "choose_method",
    "METHODS",
    "DENSE_MAX_NODES",
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
]
