"""torch_geometric_chimera: Chimera, Mamba-2's selective SSM generalized to any graph topology."""
from . import nn, ops, utils
from .nn import ChimeraConv
from .ops import resolvent_attention

__version__ = "0.1.0"

__all__ = ["nn", "ops", "utils", "ChimeraConv", "resolvent_attention", "__version__"]
