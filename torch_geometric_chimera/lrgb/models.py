"""The three models compared on LRGB: Chimera-GPS, the GraphGPS Transformer and a GCN, built alike."""
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch_geometric.data import Batch
from torch_geometric.nn import GCNConv, GPSConv, global_mean_pool
from torch_geometric.nn.conv.gcn_conv import gcn_norm
from torch_geometric.nn.norm import LayerNorm
from torch_geometric.utils import is_torch_sparse_tensor

from ..nn import ChimeraGPSConv
from .tasks import Task

MODELS = ("chimera", "gps", "gcn")
# Upper bounds of OGB's atom and bond feature vocabularies (ogb.utils.features.get_*_feature_dims).
ATOM_VOCAB = (120, 5, 12, 12, 10, 6, 7, 2, 2)
BOND_VOCAB = (6, 7, 2)


class CategoricalEncoder(nn.Module):
    """Sum of one embedding per categorical column, as OGB's ``AtomEncoder`` / ``BondEncoder``."""

    def __init__(self, vocab_sizes, channels: int):
        super().__init__()
        self.embeddings = nn.ModuleList(nn.Embedding(v, channels) for v in vocab_sizes)

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() != 2 or x.size(1) != len(self.embeddings):
            raise ValueError(f"x: expected [N, {len(self.embeddings)}] categorical features, got {list(x.shape)}")
        return sum(emb(x[:, i].long()) for i, emb in enumerate(self.embeddings))


def node_encoder(task: Task, channels: int) -> nn.Module:
    return CategoricalEncoder(ATOM_VOCAB, channels) if task.features == "molecule" else nn.Linear(14, channels)


def edge_encoder(task: Task, channels: int) -> nn.Module:
    return CategoricalEncoder(BOND_VOCAB, channels) if task.features == "molecule" else nn.Linear(2, channels)


class GCNLocal(GCNConv):
    """GCN as a GPS layer's local MPNN: it takes, and ignores, the ``edge_attr`` that GPS passes on.

    On an ``edge_index`` tensor it computes what :class:`~torch_geometric.nn.conv.GCNConv` does,
    without the boolean-mask selection with which ``add_remaining_self_loops`` drops existing
    self-loops: its output size depends on the values, which :func:`torch.compile` cannot trace
    (a graph break in every layer). Here an existing self-loop stays, with weight 0, and every node
    gets one self-loop of weight 1: the same degrees, the same messages."""

    def forward(self, x: Tensor, edge_index: Tensor, edge_attr: Optional[Tensor] = None) -> Tensor:
        if (not isinstance(edge_index, Tensor) or is_torch_sparse_tensor(edge_index) or not self.normalize
                or not self.add_self_loops or self.improved or self.cached):
            return super().forward(x, edge_index)
        num_nodes = x.size(self.node_dim)
        not_loop = (edge_index[0] != edge_index[1]).to(x.dtype)
        loops = torch.arange(num_nodes, dtype=edge_index.dtype, device=edge_index.device)
        edge_index = torch.cat([edge_index, torch.stack([loops, loops])], dim=1)
        edge_weight = torch.cat([not_loop, x.new_ones(num_nodes)])
        edge_index, edge_weight = gcn_norm(edge_index, edge_weight, num_nodes, add_self_loops=False, flow=self.flow,
                                           dtype=x.dtype)
        out = self.propagate(edge_index, x=self.lin(x), edge_weight=edge_weight)
        return out if self.bias is None else out + self.bias


class GCNBlock(nn.Module):
    """A pre-norm residual GCN layer with a feed-forward block (the tuned GCN of Tönshoff et al.)."""

    def __init__(self, channels: int, dropout: float):
        super().__init__()
        self.conv, self.dropout = GCNConv(channels, channels), dropout
        self.norm1, self.norm2 = LayerNorm(channels), LayerNorm(channels)
        self.mlp = nn.Sequential(nn.Linear(channels, 2 * channels), nn.ReLU(), nn.Dropout(dropout),
                                 nn.Linear(2 * channels, channels), nn.Dropout(dropout))

    def forward(self, x, edge_index, batch=None, edge_attr=None):
        x = x + F.dropout(F.relu(self.conv(self.norm1(x, batch), edge_index)), self.dropout, self.training)
        return x + self.mlp(self.norm2(x, batch))


class LRGBModel(nn.Module):
    r"""Encoders, ``layers`` GPS layers (or GCN blocks), and a graph- or node-level MLP head.

    Args:
        task (Task): the LRGB task (features, outputs, level).
        model (str): ``"chimera"`` (GCN + Chimera in :class:`ChimeraGPSConv`), ``"gps"`` (GCN +
            Transformer in PyG's ``GPSConv``) or ``"gcn"``.
        hidden, layers, heads, dropout, head_layers: the usual sizes.
        state_dim, expand, norm_style, method: Chimera's options.
    """

    def __init__(self, task: Task, model: str = "chimera", hidden: int = 64, layers: int = 8, heads: int = 4,
                 dropout: float = 0.1, head_layers: int = 2, state_dim: int = 64, expand: int = 1,
                 norm_style: str = "post", method: str = "auto"):
        super().__init__()
        if model not in MODELS:
            raise ValueError(f"model: expected one of {MODELS}, got {model!r}")
        self.task, self.model = task, model
        self.node_encoder = node_encoder(task, hidden)
        self.edge_encoder = edge_encoder(task, hidden) if model == "chimera" else None
        self.layers = nn.ModuleList()
        for _ in range(layers):
            if model == "chimera":
                self.layers.append(ChimeraGPSConv(
                    hidden, GCNLocal(hidden, hidden), heads=heads, dropout=dropout, norm="layer_norm",
                    norm_style=norm_style,
                    attn_kwargs=dict(state_dim=state_dim, expand=expand, edge_dim=hidden, method=method)))
            elif model == "gps":
                self.layers.append(GPSConv(hidden, GCNLocal(hidden, hidden), heads=heads, dropout=dropout,
                                           norm="layer_norm", attn_kwargs=dict(dropout=dropout)))
            else:
                self.layers.append(GCNBlock(hidden, dropout))
        head = []
        for _ in range(head_layers - 1):
            head += [nn.Linear(hidden, hidden), nn.ReLU()]
        self.head = nn.Sequential(*head, nn.Linear(hidden, task.num_outputs))

    def forward(self, data) -> Tensor:
        x = self.node_encoder(data.x)
        edge_attr = self.edge_encoder(data.edge_attr) if self.edge_encoder is not None else None
        if data.batch is not None:
            batch = data.batch
            # Known from the collation, so the norms and the pooling need not read batch.max() on the host.
            num_graphs = data.num_graphs if isinstance(data, Batch) else None
        else:
            batch, num_graphs = x.new_zeros(x.size(0), dtype=torch.long), 1
        sizes = dict(batch_size=num_graphs) if self.model == "chimera" else {}  # GPSConv takes no batch_size
        for layer in self.layers:
            x = layer(x, data.edge_index, batch, edge_attr=edge_attr, **sizes)
        if self.task.level == "graph":
            x = global_mean_pool(x, batch, num_graphs)
        return self.head(x)


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def width_for_budget(task: Task, model: str, budget: int, step: int = 4, **kwargs) -> int:
    """The largest hidden width (a multiple of ``step``) whose model has at most ``budget`` parameters."""
    low, high = step, step
    while count_parameters(LRGBModel(task, model, hidden=2 * high, **kwargs)) <= budget:
        high *= 2
    high *= 2
    while high - low > step:  # invariant: low fits, high does not
        mid = (low + high) // 2 // step * step
        if count_parameters(LRGBModel(task, model, hidden=mid, **kwargs)) <= budget:
            low = mid
        else:
            high = mid
    return low
