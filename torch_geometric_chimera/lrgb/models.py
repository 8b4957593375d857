"""The three models compared on LRGB: Chimera-GPS, the GraphGPS Transformer and a GCN, built alike."""
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch_geometric.nn import GCNConv, GPSConv, global_mean_pool
from torch_geometric.nn.norm import LayerNorm

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
    """GCN as a GPS layer's local MPNN: it takes, and ignores, the ``edge_attr`` that GPS passes on."""

    def forward(self, x: Tensor, edge_index: Tensor, edge_attr: Optional[Tensor] = None) -> Tensor:
        return super().forward(x, edge_index)


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
        batch = data.batch if data.batch is not None else x.new_zeros(x.size(0), dtype=torch.long)
        for layer in self.layers:
            x = layer(x, data.edge_index, batch, edge_attr=edge_attr)
        if self.task.level == "graph":
            x = global_mean_pool(x, batch)
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
