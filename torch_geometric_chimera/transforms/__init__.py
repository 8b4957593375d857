"""Transforms that turn images and token sequences into the grid and line graphs Chimera mixes over."""
from .image_to_grid import ImageToGrid, grid_edge_index
from .sequence_to_line import SequenceToLine, line_edge_index

__all__ = ["ImageToGrid", "SequenceToLine", "grid_edge_index", "line_edge_index"]
