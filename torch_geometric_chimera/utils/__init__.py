"""Graph topology utilities."""
from .topology import (CycleError, diameter_bound, grid_graph_dags, is_dag, is_directed_paths, is_symmetric,
                       line_graph_dags, path_roots, topological_levels)

__all__ = ["CycleError", "topological_levels", "is_dag", "is_directed_paths", "path_roots", "is_symmetric", "diameter_bound", "line_graph_dags",
           "grid_graph_dags"]
