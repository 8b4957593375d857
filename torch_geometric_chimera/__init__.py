"""torch_geometric_chimera: Chimera, Mamba-2's selective SSM generalized to any graph topology."""
from . import nn, ops, transforms, utils
from .nn import ChimeraConv, ChimeraGPSConv
from .ops import resolvent_attention

__version__ = "0.1.0"

__all__ = ["nn", "ops", "transforms", "utils", "ChimeraConv", "ChimeraGPSConv", "resolvent_attention", "__version__"]
