r"""``SequenceToLine``: a token sequence becomes its line graph (paper §4.1, Fig. 2)."""
from typing import Optional, Union

import torch
from torch import Tensor
from torch_geometric.data import Data
from torch_geometric.transforms import BaseTransform
from torch_geometric.utils import sort_edge_index

from ..utils.topology import line_graph_dags


def line_edge_index(length: int, directed: bool = False, device: Optional[torch.device] = None) -> Tensor:
    r"""Edges of the line graph over ``length`` tokens: ``t -> t + 1`` for every ``t``, and also
    ``t + 1 -> t`` unless ``directed``. Sorted by target, then source.

    :rtype: :class:`LongTensor` of shape ``[2, (length - 1)]`` or ``[2, 2 (length - 1)]``.
    """
    forward, backward = line_graph_dags(length, device=device)
    if directed:
        return forward
    return sort_edge_index(torch.cat([forward, backward], 1), num_nodes=length, sort_by_row=False)


class SequenceToLine(BaseTransform):
    r"""Turns a 1-D token sequence :math:`[T]` (or a feature sequence :math:`[T, F]`) into its line
    graph:

    - ``x``: the tokens, unchanged (``[T]`` or ``[T, F]``);
    - ``edge_index``: the line graph (:func:`line_edge_index`): the forward chain ``t -> t + 1``
      alone when ``directed=True`` (the causal, Mamba-2 case), both directions otherwise;
    - ``pos``: ``[T, 1]`` float position of every token;
    - ``seq_len``: ``[1]`` long ``T``. PyG's :class:`~torch_geometric.loader.DataLoader`
      concatenates it to ``[num_graphs]``, so a layer reads each sequence's length from it and
      never has to infer it from ``edge_index``.

    Every other key of the input :class:`~torch_geometric.data.Data` is kept.

    Args:
        directed (bool, optional): keep only the forward edges. (default: :obj:`False`)
        key (str, optional): the attribute that holds the tokens when the input is a
            :class:`~torch_geometric.data.Data`. (default: ``"x"``)
    """

    def __init__(self, directed: bool = False, key: str = "x"):
        self.directed = bool(directed)
        self.key = key

    def forward(self, data: Union[Data, Tensor]) -> Data:
        if isinstance(data, Tensor):
            tokens, data = data, Data()
        else:
            tokens = data[self.key]
            data = data.clone()
            del data[self.key]
        if not isinstance(tokens, Tensor) or tokens.dim() not in (1, 2):
            raise ValueError(f"{self.key}: expected a token tensor of shape [T] or [T, F], got "
                             f"{type(tokens).__name__ if not isinstance(tokens, Tensor) else list(tokens.shape)}")
        length = tokens.size(0)
        data.x = tokens
        data.edge_index = line_edge_index(length, self.directed, tokens.device)
        data.pos = torch.arange(length, device=tokens.device, dtype=torch.get_default_dtype()).unsqueeze(-1)
        data.seq_len = torch.tensor([length], device=tokens.device)
        data.num_nodes = length
        return data

    def __repr__(self) -> str:
        return f"{self.__class__.__name__}(directed={self.directed})"
