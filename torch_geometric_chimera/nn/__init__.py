"""Layers."""
from .adjacency import (ADJACENCIES, dag_adjacency, general_adjacency, mamba2_adjacency,
                        undirected_line_adjacency)
from .chimera_conv import ChimeraConv
from .chimera_gps_conv import ChimeraGPSConv

__all__ = ["ChimeraConv", "ChimeraGPSConv", "ADJACENCIES", "general_adjacency", "dag_adjacency", "undirected_line_adjacency",
           "mamba2_adjacency"]
