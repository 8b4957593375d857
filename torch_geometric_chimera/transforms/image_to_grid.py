r"""``ImageToGrid``: an image becomes the 4-neighbour grid graph of its patches (paper §4.1, Fig. 3)."""
from typing import Optional, Union

import torch
from torch import Tensor
from torch_geometric.data import Data
from torch_geometric.transforms import BaseTransform
from torch_geometric.utils import sort_edge_index

from ..utils.topology import grid_graph_dags


def grid_edge_index(height: int, width: int, device: Optional[torch.device] = None) -> Tensor:
    r"""Edges of the undirected ``height x width`` 4-neighbour grid, both directions, node
    ``(r, c)`` numbered ``r * width + c`` (raster order). Sorted by target, then source.

    :rtype: :class:`LongTensor` of shape ``[2, 2 (h (w - 1) + (h - 1) w)]``.
    """
    down_right, _, _, up_left = grid_graph_dags(height, width, device)  # together: every neighbour pair, both ways
    return sort_edge_index(torch.cat([down_right, up_left], 1), num_nodes=height * width, sort_by_row=False)


class ImageToGrid(BaseTransform):
    r"""Turns an image into the grid graph of its non-overlapping ``patch_size x patch_size``
    patches, as ViT cuts an image into tokens. An image :math:`[C, H, W]` with
    :math:`h = H / p` and :math:`w = W / p` becomes

    - ``x``: ``[h * w, C * p * p]``, the patches in raster order (row by row), each flattened
      channel-first like ``torch.nn.Unfold``;
    - ``edge_index``: the undirected 4-neighbour grid over the patches, both directions
      (:func:`grid_edge_index`), so node ``(r, c)`` has index ``r * w + c``;
    - ``pos``: ``[h * w, 2]`` float ``(row, column)`` of every patch;
    - ``grid_size``: ``[1, 2]`` long ``(h, w)``. PyG's :class:`~torch_geometric.loader.DataLoader`
      stacks it to ``[num_graphs, 2]``, so a layer reads each image's geometry from it and
      never has to infer it from ``edge_index``.

    Every other key of the input :class:`~torch_geometric.data.Data` (a label ``y``, ...) is kept.

    Args:
        patch_size (int, optional): side :math:`p` of a square patch; :math:`H` and :math:`W`
            must be multiples of it. (default: ``1``, one node per pixel)
        key (str, optional): the attribute that holds the image when the input is a
            :class:`~torch_geometric.data.Data`. (default: ``"x"``)

    The input is a :class:`~torch_geometric.data.Data` whose ``key`` is a ``[C, H, W]`` tensor,
    or that tensor itself (a ``[H, W]`` image is read as ``C = 1``).
    """

    def __init__(self, patch_size: int = 1, key: str = "x"):
        if isinstance(patch_size, bool) or not isinstance(patch_size, int) or patch_size < 1:
            raise ValueError(f"patch_size: expected a positive int, got {patch_size!r}")
        self.patch_size = patch_size
        self.key = key

    def forward(self, data: Union[Data, Tensor]) -> Data:
        if isinstance(data, Tensor):
            image, data = data, Data()
        else:
            image = data[self.key]
            data = data.clone()
            del data[self.key]
        if not isinstance(image, Tensor) or image.dim() not in (2, 3):
            raise ValueError(f"{self.key}: expected an image tensor of shape [C, H, W] or [H, W], got "
                             f"{type(image).__name__ if not isinstance(image, Tensor) else list(image.shape)}")
        if image.dim() == 2:
            image = image.unsqueeze(0)
        channels, height, width = image.shape
        p = self.patch_size
        if height % p or width % p:
            raise ValueError(f"{self.key}: image height and width must be multiples of patch_size={p}, "
                             f"got {height} x {width}")
        h, w = height // p, width // p
        # [C, h, p, w, p] -> [h, w, C, p, p]: patch (r, c) flattened channel-first, like nn.Unfold.
        patches = image.reshape(channels, h, p, w, p).permute(1, 3, 0, 2, 4).reshape(h * w, channels * p * p)
        rows = torch.arange(h, device=image.device).repeat_interleave(w)
        cols = torch.arange(w, device=image.device).repeat(h)
        data.x = patches
        data.edge_index = grid_edge_index(h, w, image.device)
        data.pos = torch.stack([rows, cols], dim=1).to(torch.get_default_dtype())
        data.grid_size = torch.tensor([[h, w]], device=image.device)
        data.num_nodes = h * w
        return data

    def __repr__(self) -> str:
        return f"{self.__class__.__name__}(patch_size={self.patch_size})"
