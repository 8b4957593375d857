r"""GraphGym registration: importing this module makes Chimera selectable by name in a
GraphGPS-style YAML configuration (needs ``pip install yacs pytorch_lightning``).

Registered names:

- layer ``chimera``: :class:`~torch_geometric_chimera.ChimeraConv` as a GraphGym layer, for
  ``gnn.layer_type: chimera`` in GraphGym's stock ``gnn`` network;
- network ``ChimeraGPSModel``: encoders, ``gt.layers`` GPS layers of type ``gt.layer_type``
  (``"GCN+Chimera"``, ``"GINE+Chimera"``, ``"GIN+Chimera"`` or ``"None+Chimera"``: a local MPNN plus
  Chimera in :class:`~torch_geometric_chimera.ChimeraGPSConv`), and the ``gnn.head`` head;
- config groups ``gt`` (GraphGPS's names) and ``chimera`` (state size, expansion, method, ...);
- loader format ``ChimeraLRGB``: the LRGB tasks through PyG's ``LRGBDataset`` under
  ``dataset.dir``, and the shipped ``peptides-mini``;
- node / edge encoders ``ChimeraAtom``, ``ChimeraBond``, ``ChimeraSuperpixelNode``,
  ``ChimeraSuperpixelEdge``; head ``chimera_inductive_node``; losses ``l1`` and
  ``weighted_cross_entropy``; metrics ``lrgb_ap``, ``lrgb_mae``, ``lrgb_f1`` (LRGB's definitions).

Example YAMLs for the four LRGB tasks are in ``examples/graphgym/`` of the repository.
"""
import torch
import torch.nn.functional as F
from torch import nn
from torch_geometric.data import InMemoryDataset
from torch_geometric.graphgym import register
from torch_geometric.graphgym.config import cfg
from torch_geometric.graphgym.models.gnn import FeatureEncoder, GNNPreMP
from torch_geometric.graphgym.models.layer import MLP, new_layer_config
from torch_geometric.nn import GINConv, GINEConv

from ..lrgb import TASKS, average_precision, macro_f1, mean_absolute_error
from ..lrgb.data import load_splits
from ..lrgb.models import ATOM_VOCAB, BOND_VOCAB, CategoricalEncoder, GCNLocal
from ..nn import ChimeraConv, ChimeraGPSConv

try:
    from yacs.config import CfgNode
except ImportError as error:  # GraphGym itself needs yacs for its config
    raise ImportError("torch_geometric_chimera.graphgym needs yacs and pytorch_lightning: "
                      "pip install yacs pytorch_lightning") from error

LOCAL_MODELS = ("GCN", "GINE", "GIN", "None")


# ----------------------------------------------------------------------------- config
def set_cfg_chimera(c):
    """Defaults of the ``gt`` group (GraphGPS's names) and the ``chimera`` group."""
    if "gt" not in c:
        c.gt = CfgNode()
    c.gt.layer_type = "GCN+Chimera"
    c.gt.layers = 8
    c.gt.n_heads = 4
    c.gt.dim_hidden = 64
    c.gt.dropout = 0.1
    c.gt.attn_dropout = 0.0
    c.gt.layer_norm = True     # LayerNorm (True) or BatchNorm (batch_norm: True) after each residual
    c.gt.batch_norm = False
    c.gt.norm_style = "post"   # "post" as GraphGPS, "pre" as the tuned LRGB configuration
    c.chimera = CfgNode()
    c.chimera.state_dim = 64
    c.chimera.expand = 1
    c.chimera.method = "auto"
    c.chimera.num_terms = None
    c.chimera.adjacency = "general"
    c.chimera.gamma = 0.9
    c.chimera.use_edge_attr = True


register.register_config("chimera", set_cfg_chimera)
if "chimera" not in cfg:  # graphgym.config built its global cfg before this registration
    set_cfg_chimera(cfg)


# ----------------------------------------------------------------------------- encoders
class _FeatureEncoder(nn.Module):
    key = "x"

    def forward(self, batch):
        setattr(batch, self.key, self.encoder(getattr(batch, self.key)))
        return batch


@register.register_node_encoder("ChimeraAtom")
class AtomEncoder(_FeatureEncoder):
    """OGB atom features (9 categorical columns) -> ``dim_emb``, without needing ogb."""

    def __init__(self, dim_emb: int):
        super().__init__()
        self.encoder = CategoricalEncoder(ATOM_VOCAB, dim_emb)


@register.register_edge_encoder("ChimeraBond")
class BondEncoder(_FeatureEncoder):
    key = "edge_attr"

    def __init__(self, dim_emb: int):
        super().__init__()
        self.encoder = CategoricalEncoder(BOND_VOCAB, dim_emb)


@register.register_node_encoder("ChimeraSuperpixelNode")
class SuperpixelNodeEncoder(_FeatureEncoder):
    """PascalVOC-SP / COCO-SP node features (14 floats) -> ``dim_emb``."""

    def __init__(self, dim_emb: int):
        super().__init__()
        self.encoder = nn.Linear(14, dim_emb)


@register.register_edge_encoder("ChimeraSuperpixelEdge")
class SuperpixelEdgeEncoder(_FeatureEncoder):
    key = "edge_attr"

    def __init__(self, dim_emb: int):
        super().__init__()
        self.encoder = nn.Linear(2, dim_emb)


# ----------------------------------------------------------------------------- layers
def _chimera_kwargs(edge_dim):
    return dict(state_dim=cfg.chimera.state_dim, expand=cfg.chimera.expand, method=cfg.chimera.method,
                num_terms=cfg.chimera.num_terms, adjacency=cfg.chimera.adjacency, gamma=cfg.chimera.gamma,
                edge_dim=edge_dim if cfg.chimera.use_edge_attr else None)


def _edge_dim():
    return cfg.gnn.dim_inner if cfg.dataset.edge_encoder else None


@register.register_layer("chimera")
class ChimeraLayer(nn.Module):
    """:class:`ChimeraConv` as a GraphGym layer (``gnn.layer_type: chimera``)."""

    def __init__(self, layer_config, **kwargs):
        super().__init__()
        if layer_config.dim_in != layer_config.dim_out:
            raise ValueError(f"layer_config: Chimera keeps the width, got dim_in={layer_config.dim_in} and "
                             f"dim_out={layer_config.dim_out}")
        self.model = ChimeraConv(layer_config.dim_in, heads=cfg.gt.n_heads, **_chimera_kwargs(_edge_dim()))

    def forward(self, batch):
        edge_attr = batch.get("edge_attr") if self.model.edge_proj is not None else None
        if edge_attr is not None and edge_attr.dim() == 2 and edge_attr.size(1) != self.model.edge_dim:
            edge_attr = None  # raw (unencoded) edge features: Chimera runs without them
        batch.x = self.model(batch.x, batch.edge_index, edge_attr, batch.batch)
        return batch


class _GINLocal(GINConv):
    def forward(self, x, edge_index, edge_attr=None):
        return super().forward(x, edge_index)


def _local_model(name: str, dim: int):
    if name == "GCN":
        return GCNLocal(dim, dim)
    mlp = nn.Sequential(nn.Linear(dim, dim), nn.ReLU(), nn.Linear(dim, dim))
    if name == "GINE":
        return GINEConv(mlp, edge_dim=_edge_dim())
    if name == "GIN":
        return _GINLocal(mlp)
    return None


@register.register_layer("chimera_gps")
class ChimeraGPSLayer(nn.Module):
    """One GPS layer with a local MPNN and Chimera, from ``cfg.gt`` and ``cfg.chimera``."""

    def __init__(self, dim: int):
        super().__init__()
        local, _, global_model = cfg.gt.layer_type.partition("+")
        if local not in LOCAL_MODELS or global_model != "Chimera":
            raise ValueError(f"gt.layer_type: expected '<local>+Chimera' with <local> one of {LOCAL_MODELS}, "
                             f"got {cfg.gt.layer_type!r}")
        norm = "layer_norm" if cfg.gt.layer_norm else "batch_norm" if cfg.gt.batch_norm else None
        self.layer = ChimeraGPSConv(dim, _local_model(local, dim), heads=cfg.gt.n_heads, dropout=cfg.gt.dropout,
                                    norm=norm, norm_style=cfg.gt.norm_style,
                                    attn_kwargs=dict(_chimera_kwargs(_edge_dim()), dropout=cfg.gt.attn_dropout))

    def forward(self, batch):
        kwargs = {"edge_attr": batch.edge_attr} if batch.get("edge_attr") is not None and _edge_dim() else {}
        batch.x = self.layer(batch.x, batch.edge_index, batch.batch, **kwargs)
        return batch


# ----------------------------------------------------------------------------- network and head
@register.register_network("ChimeraGPSModel")
class ChimeraGPSModel(nn.Module):
    """GraphGPS's model with Chimera layers: feature encoders, optional pre-MP, ``gt.layers`` GPS
    layers, head ``gnn.head``. For a known LRGB task the output width is the task's, not the number
    of labels that happen to occur in the data."""

    def __init__(self, dim_in: int, dim_out: int):
        super().__init__()
        if cfg.dataset.name in TASKS:
            dim_out = TASKS[cfg.dataset.name].num_outputs
        self.encoder = FeatureEncoder(dim_in)
        dim_in = self.encoder.dim_in
        if cfg.gnn.layers_pre_mp > 0:
            self.pre_mp = GNNPreMP(dim_in, cfg.gnn.dim_inner, cfg.gnn.layers_pre_mp)
            dim_in = cfg.gnn.dim_inner
        if not cfg.gt.dim_hidden == cfg.gnn.dim_inner == dim_in:
            raise ValueError(f"gt.dim_hidden: expected gt.dim_hidden == gnn.dim_inner == the encoded width, got "
                             f"{cfg.gt.dim_hidden}, {cfg.gnn.dim_inner} and {dim_in}")
        self.layers = nn.Sequential(*[ChimeraGPSLayer(cfg.gt.dim_hidden) for _ in range(cfg.gt.layers)])
        self.post_mp = register.head_dict[cfg.gnn.head](dim_in=cfg.gnn.dim_inner, dim_out=dim_out)

    def forward(self, batch):
        for module in self.children():
            batch = module(batch)
        return batch


@register.register_head("chimera_inductive_node")
class InductiveNodeHead(nn.Module):
    """Node-level predictions inside graph-level datasets (the superpixel tasks)."""

    def __init__(self, dim_in: int, dim_out: int):
        super().__init__()
        self.layer_post_mp = MLP(new_layer_config(dim_in, dim_out, cfg.gnn.layers_post_mp, has_act=False,
                                                  has_bias=True, cfg=cfg))

    def forward(self, batch):
        return self.layer_post_mp(batch.x), batch.y


# ----------------------------------------------------------------------------- losses and metrics
@register.register_loss("l1")
def l1_loss(pred, true):
    if cfg.model.loss_fun == "l1":
        return F.l1_loss(pred, true.float().view_as(pred)), pred


@register.register_loss("weighted_cross_entropy")
def weighted_cross_entropy(pred, true):
    """LRGB's loss for the superpixel tasks: class weights from the batch's label frequencies."""
    if cfg.model.loss_fun == "weighted_cross_entropy":
        counts = torch.bincount(true, minlength=pred.size(-1)).float()
        weight = (true.numel() - counts) / true.numel() * (counts > 0)
        return F.cross_entropy(pred, true, weight=weight), pred


def _cat(tensors):
    return torch.cat([t.detach().cpu() for t in tensors]) if isinstance(tensors, (list, tuple)) else tensors


@register.register_metric("lrgb_ap")
def lrgb_ap(true, pred, task_type):
    true, pred = _cat(true), _cat(pred)
    return round(average_precision(true.view(pred.shape).float(), pred), cfg.round)


@register.register_metric("lrgb_mae")
def lrgb_mae(true, pred, task_type):
    true, pred = _cat(true), _cat(pred)
    return round(mean_absolute_error(true.view(pred.shape).float(), pred), cfg.round)


@register.register_metric("lrgb_f1")
def lrgb_f1(true, pred, task_type):
    return round(macro_f1(_cat(true), _cat(pred)), cfg.round)


# ----------------------------------------------------------------------------- data
@register.register_loader("ChimeraLRGB")
def load_lrgb(format, name, dataset_dir):
    """The three splits of an LRGB task joined into one dataset with GraphGym's split indices."""
    if format != "ChimeraLRGB":
        return None
    splits = load_splits(name, None if name == "peptides-mini" else dataset_dir)
    data_list = [data for split in ("train", "val", "test") for data in splits[split]]
    dataset = InMemoryDataset()
    dataset._data, dataset.slices = InMemoryDataset.collate(data_list)
    start = 0
    for split in ("train", "val", "test"):
        index = torch.arange(start, start + len(splits[split]))
        start += len(splits[split])
        dataset._data[f"{split}_graph_index"] = index
        dataset.slices[f"{split}_graph_index"] = torch.tensor([0, index.numel()])
    return dataset
