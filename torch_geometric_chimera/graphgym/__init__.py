r"""GraphGym registration: importing this module makes Chimera selectable by name in a
GraphGym or GraphGPS YAML configuration (needs ``pip install yacs pytorch_lightning``).

Registered names:

- layer ``chimera``: :class:`~torch_geometric_chimera.ChimeraConv` as a GraphGym layer, for
  ``gnn.layer_type: chimera`` in GraphGym's stock ``gnn`` network;
- network ``ChimeraGPSModel``: encoders, ``gt.layers`` GPS layers of type ``gt.layer_type`` =
  ``"<local>+Chimera"``, and the ``gnn.head`` head. With ``chimera.gps_layer: pyg`` a layer is
  :class:`~torch_geometric_chimera.ChimeraGPSConv` and ``<local>`` is ``GCN``, ``GINE``, ``GIN`` or
  ``None``; with ``chimera.gps_layer: graphgps`` it is GraphGPS's own ``GPSLayer`` with Chimera as
  its global model, so ``<local>`` is any local model GraphGPS has (``CustomGatedGCN``, ``GINE``,
  ``GAT``, ``PNA``, ...). ``auto`` (the default) takes ``graphgps`` when the ``graphgps`` package
  has been imported, else ``pyg`` (see :mod:`torch_geometric_chimera.graphgym.graphgps`);
- config groups ``gt`` (GraphGPS's names: only keys that are missing are added, with GraphGPS's
  default values, so a key GraphGPS set is never changed) and ``chimera`` (state size, expansion,
  method, ``norm_style``, ``gps_layer``, ...);
- loader format ``ChimeraLRGB``: the LRGB tasks through PyG's ``LRGBDataset`` under
  ``dataset.dir`` (also under GraphGPS's names ``peptides-functional`` / ``peptides-structural``),
  and the shipped ``peptides-mini``;
- node / edge encoders ``ChimeraAtom``, ``ChimeraBond``, ``ChimeraSuperpixelNode``,
  ``ChimeraSuperpixelEdge``; head ``chimera_inductive_node``;
- losses ``chimera_l1`` and ``chimera_weighted_cross_entropy``, which answer
  ``model.loss_fun: l1`` / ``weighted_cross_entropy`` unless another module (GraphGPS) registered
  its own loss for it;
- metrics ``ap``, ``mae``, ``f1`` (LRGB's definitions, named as GraphGPS's logger names its
  statistics, so ``metric_best: ap`` works in GraphGym's loop and GraphGPS's), and the older aliases
  ``lrgb_ap``, ``lrgb_mae``, ``lrgb_f1``.

A name that another module registered first is left alone: Chimera's entry is skipped with one
warning. Example YAMLs for the four LRGB tasks are in ``examples/graphgym/`` of the repository.
"""
import sys
import warnings
import weakref

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

LOCAL_MODELS = ("GCN", "GINE", "GIN", "None")  # local models of the ``pyg`` GPS layer
GPS_LAYERS = ("auto", "pyg", "graphgps")
# GraphGPS's names for the LRGB peptides tasks -> the extension's
DATASET_ALIASES = {"peptides-functional": "peptides-func", "peptides-structural": "peptides-struct"}


# ----------------------------------------------------------------------------- registration
_warned = set()


def _is_ours(obj) -> bool:
    return (getattr(obj, "__module__", None) or "").startswith(__name__)


def _register(mapping: dict, kind: str, name: str, obj=None):
    """Registers ``obj`` under ``name`` only if the name is free (or holds an earlier copy of this
    module's own object, e.g. after a reload); otherwise keeps what is there and warns once.
    GraphGym's own ``register_*`` raise ``KeyError`` on a taken name instead."""
    if obj is None:
        return lambda obj: _register(mapping, kind, name, obj)
    taken = mapping.get(name)
    if taken is not None and taken is not obj and not _is_ours(taken):
        if (kind, name) not in _warned:
            _warned.add((kind, name))
            owner = getattr(taken, "__module__", type(taken).__name__)
            warnings.warn(f"torch_geometric_chimera.graphgym: GraphGym {kind} {name!r} is already registered by "
                          f"{owner}; keeping it and skipping Chimera's", stacklevel=2)
        return obj
    mapping[name] = obj
    return obj


def _put_first(mapping: dict, name: str):
    """Moves ``name`` to the front of a registry that GraphGym scans in order (loaders)."""
    if name in mapping:
        items = [(key, value) for key, value in mapping.items() if key != name]
        value = mapping[name]
        mapping.clear()
        mapping[name] = value
        mapping.update(items)


# ----------------------------------------------------------------------------- config
# GraphGPS's own defaults for the ``gt`` keys this module reads, so that a YAML that leaves one of
# them unset means the same model with or without GraphGPS. Only ``layer_type`` differs (GraphGPS:
# ``SANLayer``, a layer of its own).
GT_DEFAULTS = dict(layer_type="GCN+Chimera", layers=3, n_heads=8, dim_hidden=64, dropout=0.0, attn_dropout=0.0,
                   layer_norm=False, batch_norm=True)
CHIMERA_DEFAULTS = dict(state_dim=64, expand=1, method="auto", num_terms=None, adjacency="general", gamma=0.9,
                        use_edge_attr=True,
                        transitions="positive",  # "signed": transitions in (-1, 1] (ChimeraConv's docstring)
                        norm_style="post",  # "post" as GraphGPS, "pre" as the tuned LRGB configuration
                        gps_layer="auto")   # see the module docstring


def _add_missing(node, defaults):
    for key, value in defaults.items():
        if key not in node:
            node[key] = value


_own_groups = []  # weak references to the ``gt`` groups this module created (``set_cfg`` resets those)


def _is_own_group(node) -> bool:
    _own_groups[:] = [ref for ref in _own_groups if ref() is not None]
    return any(ref() is node for ref in _own_groups)


def set_cfg_chimera(c):
    """Defaults of the ``chimera`` group, and of the ``gt`` group when no other module (GraphGPS)
    owns it; in a ``gt`` group of another module only the missing keys are added, so that a key it
    set is never changed."""
    if "gt" not in c or _is_own_group(c.gt):
        c.gt = CfgNode()
        _own_groups.append(weakref.ref(c.gt))
    _add_missing(c.gt, GT_DEFAULTS)
    c.chimera = CfgNode()
    _add_missing(c.chimera, CHIMERA_DEFAULTS)


_register(register.config_dict, "config", "chimera", set_cfg_chimera)
if "chimera" not in cfg:  # graphgym.config built its global cfg before this registration
    set_cfg_chimera(cfg)


# ----------------------------------------------------------------------------- encoders
class _FeatureEncoder(nn.Module):
    key = "x"

    def forward(self, batch):
        setattr(batch, self.key, self.encoder(getattr(batch, self.key)))
        return batch


@_register(register.node_encoder_dict, "node encoder", "ChimeraAtom")
class AtomEncoder(_FeatureEncoder):
    """OGB atom features (9 categorical columns) -> ``dim_emb``, without needing ogb."""

    def __init__(self, dim_emb: int):
        super().__init__()
        self.encoder = CategoricalEncoder(ATOM_VOCAB, dim_emb)


@_register(register.edge_encoder_dict, "edge encoder", "ChimeraBond")
class BondEncoder(_FeatureEncoder):
    key = "edge_attr"

    def __init__(self, dim_emb: int):
        super().__init__()
        self.encoder = CategoricalEncoder(BOND_VOCAB, dim_emb)


@_register(register.node_encoder_dict, "node encoder", "ChimeraSuperpixelNode")
class SuperpixelNodeEncoder(_FeatureEncoder):
    """PascalVOC-SP / COCO-SP node features (14 floats) -> ``dim_emb``."""

    def __init__(self, dim_emb: int):
        super().__init__()
        self.encoder = nn.Linear(14, dim_emb)


@_register(register.edge_encoder_dict, "edge encoder", "ChimeraSuperpixelEdge")
class SuperpixelEdgeEncoder(_FeatureEncoder):
    key = "edge_attr"

    def __init__(self, dim_emb: int):
        super().__init__()
        self.encoder = nn.Linear(2, dim_emb)


# ----------------------------------------------------------------------------- layers
def _chimera_kwargs(edge_dim):
    return dict(state_dim=cfg.chimera.state_dim, expand=cfg.chimera.expand, method=cfg.chimera.method,
                num_terms=cfg.chimera.num_terms, adjacency=cfg.chimera.adjacency, gamma=cfg.chimera.gamma,
                transitions=cfg.chimera.transitions, edge_dim=edge_dim if cfg.chimera.use_edge_attr else None)


def _edge_dim():
    return cfg.gnn.dim_inner if cfg.dataset.edge_encoder else None


@_register(register.layer_dict, "layer", "chimera")
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


def _graphgps_loaded() -> bool:
    return "graphgps" in sys.modules


def gps_layer_kind() -> str:
    """``"pyg"`` or ``"graphgps"``: which GPS layer ``ChimeraGPSModel`` builds for ``cfg``."""
    local, _, global_model = cfg.gt.layer_type.partition("+")
    if global_model != "Chimera":
        raise ValueError(f"gt.layer_type: expected '<local>+Chimera', got {cfg.gt.layer_type!r}")
    kind = cfg.chimera.gps_layer
    if kind not in GPS_LAYERS:
        raise ValueError(f"chimera.gps_layer: expected one of {GPS_LAYERS}, got {kind!r}")
    if kind == "auto":
        kind = "graphgps" if _graphgps_loaded() else "pyg"
    if kind == "pyg" and local not in LOCAL_MODELS:
        raise ValueError(f"gt.layer_type: expected '<local>+Chimera' with <local> one of {LOCAL_MODELS}, got "
                         f"{cfg.gt.layer_type!r}; GraphGPS's local models ({local!r}, ...) need GraphGPS's GPSLayer: "
                         f"run inside GraphGPS (python -m torch_geometric_chimera.graphgym.graphgps_main) with "
                         f"chimera.gps_layer 'auto' or 'graphgps'")
    if kind == "graphgps" and cfg.chimera.norm_style != "post":
        raise ValueError(f"chimera.norm_style: GraphGPS's GPSLayer normalizes after each residual ('post'), got "
                         f"{cfg.chimera.norm_style!r}; set chimera.gps_layer: pyg for ChimeraGPSConv's pre-norm")
    return kind


@_register(register.layer_dict, "layer", "chimera_gps")
class ChimeraGPSLayer(nn.Module):
    """One :class:`ChimeraGPSConv` with a local MPNN and Chimera, from ``cfg.gt`` and ``cfg.chimera``."""

    def __init__(self, dim: int):
        super().__init__()
        local = cfg.gt.layer_type.partition("+")[0]
        if local not in LOCAL_MODELS or not cfg.gt.layer_type.endswith("+Chimera"):
            raise ValueError(f"gt.layer_type: expected '<local>+Chimera' with <local> one of {LOCAL_MODELS}, "
                             f"got {cfg.gt.layer_type!r}")
        norm = "layer_norm" if cfg.gt.layer_norm else "batch_norm" if cfg.gt.batch_norm else None
        self.layer = ChimeraGPSConv(dim, _local_model(local, dim), heads=cfg.gt.n_heads, dropout=cfg.gt.dropout,
                                    norm=norm, norm_style=cfg.chimera.norm_style,
                                    attn_kwargs=dict(_chimera_kwargs(_edge_dim()), dropout=cfg.gt.attn_dropout))

    def forward(self, batch):
        kwargs = {"edge_attr": batch.edge_attr} if batch.get("edge_attr") is not None and _edge_dim() else {}
        batch.x = self.layer(batch.x, batch.edge_index, batch.batch, **kwargs)
        return batch


# ----------------------------------------------------------------------------- network and head
@_register(register.network_dict, "network", "ChimeraGPSModel")
class ChimeraGPSModel(nn.Module):
    """GraphGPS's model with Chimera as the global model: feature encoders, optional pre-MP,
    ``gt.layers`` GPS layers (:class:`ChimeraGPSLayer`, or GraphGPS's ``GPSLayer`` with Chimera, by
    :func:`gps_layer_kind`), head ``gnn.head``. For a known LRGB task the output width is the task's,
    not the number of labels that happen to occur in the data."""

    def __init__(self, dim_in: int, dim_out: int):
        super().__init__()
        kind = gps_layer_kind()
        name = DATASET_ALIASES.get(cfg.dataset.name, cfg.dataset.name)
        if name in TASKS:
            dim_out = TASKS[name].num_outputs
        if kind == "graphgps":
            from .graphgps import graphgps_chimera_layer, graphgps_feature_encoder
            self.encoder = graphgps_feature_encoder()(dim_in)
        else:
            self.encoder = FeatureEncoder(dim_in)
        dim_in = self.encoder.dim_in
        if cfg.gnn.layers_pre_mp > 0:
            self.pre_mp = GNNPreMP(dim_in, cfg.gnn.dim_inner, cfg.gnn.layers_pre_mp)
            dim_in = cfg.gnn.dim_inner
        if not cfg.gt.dim_hidden == cfg.gnn.dim_inner == dim_in:
            raise ValueError(f"gt.dim_hidden: expected gt.dim_hidden == gnn.dim_inner == the encoded width, got "
                             f"{cfg.gt.dim_hidden}, {cfg.gnn.dim_inner} and {dim_in}")
        layer = graphgps_chimera_layer if kind == "graphgps" else ChimeraGPSLayer
        self.layers = nn.Sequential(*[layer(cfg.gt.dim_hidden) for _ in range(cfg.gt.layers)])
        self.post_mp = register.head_dict[cfg.gnn.head](dim_in=cfg.gnn.dim_inner, dim_out=dim_out)

    def forward(self, batch):
        for module in self.children():
            batch = module(batch)
        return batch


@_register(register.head_dict, "head", "chimera_inductive_node")
class InductiveNodeHead(nn.Module):
    """Node-level predictions inside graph-level datasets (the superpixel tasks)."""

    def __init__(self, dim_in: int, dim_out: int):
        super().__init__()
        self.layer_post_mp = MLP(new_layer_config(dim_in, dim_out, cfg.gnn.layers_post_mp, has_act=False,
                                                  has_bias=True, cfg=cfg))

    def forward(self, batch):
        return self.layer_post_mp(batch.x), batch.y


# ----------------------------------------------------------------------------- losses and metrics
# GraphGym tries every registered loss in turn and takes the first answer, so a loss of another
# module for the same ``loss_fun`` (GraphGPS's ``l1_losses`` and ``weighted_cross_entropy``, same
# definitions) would race with these: they step aside for it instead.
LOSS_OWNERS = {"l1": ("l1", "l1_losses"), "weighted_cross_entropy": ("weighted_cross_entropy",)}


def _answers(loss_fun: str) -> bool:
    if cfg.model.loss_fun != loss_fun:
        return False
    return not any(name in register.loss_dict and not _is_ours(register.loss_dict[name])
                   for name in LOSS_OWNERS[loss_fun])


@_register(register.loss_dict, "loss", "chimera_l1")
def l1_loss(pred, true):
    """``model.loss_fun: l1``."""
    if _answers("l1"):
        return F.l1_loss(pred, true.float().view_as(pred)), pred


@_register(register.loss_dict, "loss", "chimera_weighted_cross_entropy")
def weighted_cross_entropy(pred, true):
    """LRGB's loss for the superpixel tasks: class weights from the batch's label frequencies."""
    if _answers("weighted_cross_entropy"):
        counts = torch.bincount(true, minlength=pred.size(-1)).float()
        weight = (true.numel() - counts) / true.numel() * (counts > 0)
        return F.cross_entropy(pred, true, weight=weight), pred


def _cat(tensors):
    return torch.cat([t.detach().cpu() for t in tensors]) if isinstance(tensors, (list, tuple)) else tensors


def ap(true, pred, task_type):
    """LRGB's average precision (peptides-func), as GraphGPS's logger reports ``ap``."""
    true, pred = _cat(true), _cat(pred)
    return round(average_precision(true.view(pred.shape).float(), pred), cfg.round)


def mae(true, pred, task_type):
    """Mean absolute error (peptides-struct), as GraphGPS's logger reports ``mae``."""
    true, pred = _cat(true), _cat(pred)
    return round(mean_absolute_error(true.view(pred.shape).float(), pred), cfg.round)


def f1(true, pred, task_type):
    """Macro F1 (the superpixel tasks), as GraphGPS's logger reports ``f1``."""
    return round(macro_f1(_cat(true), _cat(pred)), cfg.round)


# the first name of each is the statistic GraphGPS's logger writes; ``lrgb_*`` are the older names
METRICS = {"ap": ap, "mae": mae, "f1": f1, "lrgb_ap": ap, "lrgb_mae": mae, "lrgb_f1": f1}
for _name, _metric in METRICS.items():
    _register(register.metric_dict, "metric", _name, _metric)
lrgb_ap, lrgb_mae, lrgb_f1 = ap, mae, f1


# ----------------------------------------------------------------------------- data
def load_lrgb(format, name, dataset_dir):
    """The three splits of an LRGB task joined into one dataset with GraphGym's split indices."""
    if format != "ChimeraLRGB":
        return None
    name = DATASET_ALIASES.get(name, name)
    enabled = [key for key in cfg if key.startswith("posenc_") and cfg[key].get("enable", False)]
    if enabled:
        raise ValueError(f"dataset.format: 'ChimeraLRGB' computes no positional encodings, but {enabled} are "
                         f"enabled; use GraphGPS's own loader for them (dataset.format: OGB, dataset.name: "
                         f"peptides-functional, ...)")
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


_register(register.loader_dict, "loader", "ChimeraLRGB", load_lrgb)
if register.loader_dict.get("ChimeraLRGB") is load_lrgb:
    # It declines every other format, whereas GraphGPS's master loader raises on the formats it
    # does not know, and GraphGym asks the loaders in order: ask this one first.
    _put_first(register.loader_dict, "ChimeraLRGB")
