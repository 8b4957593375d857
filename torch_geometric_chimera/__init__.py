"""torch_geometric_chimera: Chimera, Mamba-2's selective SSM generalized to any graph topology."""
from . import ops, utils
from .ops import resolvent_attention

__version__ = "0.1.0"

__all__ = ["ops", "utils", "resolvent_attention", "__version__"]
