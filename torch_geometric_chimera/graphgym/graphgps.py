r"""Chimera inside the GraphGPS repository (``rampasek/GraphGPS``, checked at commit ``2801570``).

GraphGPS is not a package on PyPI; this module imports its ``graphgps`` package only when asked
(from a checkout on ``sys.path``), so importing it costs nothing without GraphGPS.

- :func:`graphgps_chimera_layer`: GraphGPS's own ``GPSLayer`` with Chimera as the global model, so
  that ``gt.layer_type: <local>+Chimera`` keeps any of GraphGPS's local models (``CustomGatedGCN``,
  ``GINE``, ``GAT``, ``PNA``, ``GENConv``, ...), its normalizations, feed-forward block, residuals
  and positional-encoding options. ``ChimeraGPSModel`` builds it when ``chimera.gps_layer`` is
  ``graphgps`` (or ``auto`` with ``graphgps`` imported).
- :func:`apply_compat_fixes`: what GraphGPS itself needs on current libraries (none of it is about
  Chimera): a ``torch_scatter`` stand-in, PyG's data classes allowed by ``torch.load``'s
  ``weights_only`` default, and scikit-learn >= 1.6 without ``mean_squared_error(squared=...)``.
- :func:`write_graphgps_peptides`: small fixtures in GraphGPS's own on-disk format of
  ``peptides-functional`` / ``peptides-structural``, for a one-epoch run without the download.

The entry point :mod:`torch_geometric_chimera.graphgym.graphgps_main` puts these together.
"""
import os
import pickle
import sys
import tempfile
import types
from typing import List, Optional, Sequence

import torch
import torch.nn.functional as F
from torch_geometric.graphgym.config import cfg

from ..nn import ChimeraConv

# GraphGPS's on-disk layout of the two peptides tasks: folder, raw file, MD5 "release tag" file
# (GraphGPS asks on stdin whether to re-download when it is missing), split file, outputs.
PEPTIDES_FORMAT = {
    "peptides-functional": ("peptide_multi_class_dataset.csv.gz", "701eb743e899f4d793f0e13c8fa5a1b4",
                            "splits_random_stratified_peptide.pickle", 10),
    "peptides-structural": ("peptide_structure_normalized_dataset.csv.gz", "c240c1c15466b5c907c63e180fa8aa89",
                            "splits_random_stratified_peptide_structure.pickle", 11),
}


def _import_graphgps(what: str):
    try:
        import graphgps  # noqa: F401
        from graphgps.layer.gps_layer import GPSLayer
        from graphgps.network.gps_model import FeatureEncoder
    except ImportError as error:
        raise ValueError(f"chimera.gps_layer: {what} needs GraphGPS's 'graphgps' package on sys.path (a checkout "
                         f"of rampasek/GraphGPS; python -m torch_geometric_chimera.graphgym.graphgps_main sets it "
                         f"up), but importing it failed: {error}") from error
    return GPSLayer, FeatureEncoder


def graphgps_feature_encoder():
    """GraphGPS's ``FeatureEncoder`` (sizes the edge encoder as GraphGPS's local models expect)."""
    return _import_graphgps("'graphgps'")[1]


_LAYER_CLASS = None


def graphgps_layer_class():
    r"""The class of :func:`graphgps_chimera_layer`: a subclass of GraphGPS's ``GPSLayer``.

    ``GPSLayer`` is built with the ``Transformer`` global model and its attention module is then
    replaced by :class:`~torch_geometric_chimera.ChimeraConv`: ``GPSLayer.forward`` hands the
    padded dense batch to ``_sa_block``, which here runs Chimera on the graph's own nodes and edges
    (kept aside by ``forward``) and pads the result back. Everything else is GraphGPS's code:

    .. math::
        \mathbf{h} = \mathrm{FF}\big(\mathrm{Norm}(\mathbf{x} + \mathrm{MPNN}(\mathbf{x}))
        + \mathrm{Norm}(\mathbf{x} + \mathrm{Chimera}(\mathbf{x}, \mathcal{E}))\big)
    """
    global _LAYER_CLASS
    if _LAYER_CLASS is not None:
        return _LAYER_CLASS
    GPSLayer = _import_graphgps("gps_layer 'graphgps'")[0]

    class GraphGPSChimeraLayer(GPSLayer):
        """GraphGPS's ``GPSLayer`` with :class:`~torch_geometric_chimera.ChimeraConv` as its global
        model (built by :func:`graphgps_chimera_layer`)."""

        def __init__(self, dim_h: int, local_gnn_type: str, num_heads: int, chimera_kwargs: dict,
                     attn_dropout: float = 0.0, **gps_kwargs):
            super().__init__(dim_h, local_gnn_type, "Transformer", num_heads, attn_dropout=attn_dropout,
                             log_attn_weights=False, **gps_kwargs)
            self.self_attn = ChimeraConv(dim_h, heads=num_heads, **chimera_kwargs)
            self.use_edge_attr = chimera_kwargs.get("edge_dim") is not None
            self._graph = None

        def forward(self, batch):
            # the input edge features: CustomGatedGCN overwrites batch.edge_attr before the global model runs
            edge_attr = batch.get("edge_attr") if self.use_edge_attr else None
            self._graph = (batch.edge_index, edge_attr, batch.batch)
            try:
                return super().forward(batch)
            finally:
                self._graph = None

        def _sa_block(self, x, attn_mask, key_padding_mask):
            if self._graph is None:
                raise RuntimeError("GraphGPSChimeraLayer: _sa_block runs only inside forward")
            edge_index, edge_attr, index = self._graph
            real = ~key_padding_mask
            out = self.self_attn(x[real], edge_index, edge_attr, index)
            out = F.dropout(out, p=self.attn_dropout, training=self.training)
            dense = x.new_zeros(x.shape)
            dense[real] = out  # GPSLayer takes [mask] of this again
            return dense

        def extra_repr(self):
            return (f"summary: dim_h={self.dim_h}, local_gnn_type={self.local_gnn_type}, global_model_type=Chimera, "
                    f"heads={self.num_heads}")

    GraphGPSChimeraLayer.__module__ = __name__
    _LAYER_CLASS = GraphGPSChimeraLayer
    return _LAYER_CLASS


def graphgps_chimera_layer(dim: int):
    """One GraphGPS ``GPSLayer`` with Chimera, from ``cfg`` as GraphGPS's ``GPSModel`` reads it."""
    from . import _chimera_kwargs
    local = cfg.gt.layer_type.partition("+")[0]
    edge_dim = (cfg.gnn.dim_edge if "dim_edge" in cfg.gnn else cfg.gnn.dim_inner) if cfg.dataset.edge_encoder \
        else None
    gps_kwargs = dict(act=cfg.gnn.act, dropout=cfg.gt.dropout, layer_norm=cfg.gt.layer_norm,
                      batch_norm=cfg.gt.batch_norm)
    if "pna_degrees" in cfg.gt:
        gps_kwargs["pna_degrees"] = cfg.gt.pna_degrees
    if "posenc_EquivStableLapPE" in cfg:
        gps_kwargs["equivstable_pe"] = cfg.posenc_EquivStableLapPE.enable
    return graphgps_layer_class()(dim, local, cfg.gt.n_heads, _chimera_kwargs(edge_dim),
                                  attn_dropout=cfg.gt.attn_dropout, **gps_kwargs)


# ----------------------------------------------------------------------------- compatibility fixes
_REDUCE = {"sum": "sum", "add": "sum", "mean": "mean", "max": "amax", "min": "amin", "mul": "prod"}


def _scatter(src, index, dim=-1, out=None, dim_size=None, reduce="sum"):
    from torch_geometric.utils import scatter
    dim = dim if dim >= 0 else src.dim() + dim
    if index.dim() == 1:
        result = scatter(src, index, dim, dim_size=dim_size, reduce="sum" if reduce == "add" else reduce)
    else:  # torch_scatter also takes an index broadcast to src's shape
        index = index.expand_as(src)
        size = list(src.shape)
        size[dim] = dim_size if dim_size is not None else int(index.max()) + 1 if index.numel() else 0
        result = src.new_zeros(size).scatter_reduce(dim, index, src, _REDUCE[reduce], include_self=False)
    if out is not None:
        return out.add_(result) if reduce in ("sum", "add") else out.copy_(result)
    return result


def _scatter_max(src, index, dim=-1, out=None, dim_size=None):
    dim = dim if dim >= 0 else src.dim() + dim
    values = _scatter(src, index, dim, dim_size=dim_size, reduce="max")
    shape = [1] * src.dim()
    shape[dim] = -1
    full = index.view(shape).expand_as(src)
    position = torch.arange(src.size(dim), device=src.device).view(shape).expand_as(src)
    # torch_scatter's argmax: the first position of the maximum, src.size(dim) for an empty group
    candidate = torch.where(src == values.gather(dim, full), position, src.size(dim))
    argmax = torch.full(values.shape, src.size(dim), dtype=torch.long, device=src.device)
    argmax = argmax.scatter_reduce(dim, full, candidate, "amin")
    return values, argmax


def torch_scatter_standin() -> types.ModuleType:
    """A module with the ``torch_scatter`` functions GraphGPS imports (``scatter``, ``scatter_add``,
    ``scatter_max``), computed with PyG's own :func:`torch_geometric.utils.scatter`."""
    module = types.ModuleType("torch_scatter")
    module.__doc__ = "torch_scatter stand-in of torch_geometric_chimera.graphgym.graphgps (PyG's scatter)"
    module.scatter = _scatter
    module.scatter_add = lambda src, index, dim=-1, out=None, dim_size=None: _scatter(src, index, dim, out,
                                                                                      dim_size, "sum")
    module.scatter_mean = lambda src, index, dim=-1, out=None, dim_size=None: _scatter(src, index, dim, out,
                                                                                       dim_size, "mean")
    module.scatter_max = _scatter_max
    return module


def _rmse_aware(mean_squared_error):
    def wrapped(y_true, y_pred, *args, squared=True, **kwargs):
        error = mean_squared_error(y_true, y_pred, *args, **kwargs)
        return error if squared else error ** 0.5
    wrapped.chimera_compat_fix = True
    return wrapped


def _smiles2graph_needs_rdkit(smiles_string):
    raise ImportError("smiles2graph: processing SMILES needs rdkit (pip install rdkit); datasets that are already "
                      "processed load without it")


def apply_compat_fixes(log=print) -> List[str]:
    """Fixes GraphGPS (commit ``2801570``) needs under torch >= 2.6, PyG 2.8 and scikit-learn >= 1.6,
    each applied only where needed; returns (and ``log``\\ s) one line per fix applied. Call it before
    ``import graphgps`` (the ``torch_scatter`` stand-in) and again after it (scikit-learn)."""
    applied = []
    try:
        import torch_scatter  # noqa: F401
    except ImportError:
        sys.modules["torch_scatter"] = torch_scatter_standin()
        applied.append("torch_scatter is not installed: GraphGPS's imports of it get a stand-in built on "
                       "torch_geometric.utils.scatter")
    try:
        import ogb.utils
        if not hasattr(ogb.utils, "smiles2graph"):  # ogb leaves it out when rdkit is missing
            ogb.utils.smiles2graph = _smiles2graph_needs_rdkit
            applied.append("rdkit is not installed, so ogb.utils has no smiles2graph: GraphGPS's peptides "
                           "datasets load when already processed, and ask for rdkit only to process raw SMILES")
    except ImportError:
        pass
    from torch_geometric.data import Data, storage
    from torch_geometric.data.data import DataEdgeAttr, DataTensorAttr
    allowed = [Data, DataEdgeAttr, DataTensorAttr, storage.GlobalStorage]
    if hasattr(torch.serialization, "get_safe_globals") and \
            not set(allowed) <= set(torch.serialization.get_safe_globals()):
        torch.serialization.add_safe_globals(allowed)
        applied.append("torch.load(weights_only=True) (the default since torch 2.6) rejects the processed "
                       "datasets GraphGPS saves: PyG's Data classes are added to torch's safe globals")
    logger = sys.modules.get("graphgps.logger")
    if logger is not None and not hasattr(logger.mean_squared_error, "chimera_compat_fix"):
        import inspect
        if "squared" not in inspect.signature(logger.mean_squared_error).parameters:
            logger.mean_squared_error = _rmse_aware(logger.mean_squared_error)
            applied.append("scikit-learn >= 1.6 has no mean_squared_error(squared=False): GraphGPS's logger "
                           "gets a version that takes it")
    for line in applied:
        log(f"[torch_geometric_chimera] GraphGPS compatibility fix: {line}")
    return applied


# ----------------------------------------------------------------------------- fixtures
def write_graphgps_peptides(root: str, name: str = "peptides-functional",
                            graphs_per_split: Sequence[int] = (12, 6, 6), seed: int = 0) -> str:
    """Writes random peptide-like graphs in GraphGPS's own on-disk format of ``name``
    (``peptides-functional`` or ``peptides-structural``) under ``root/name``, as GraphGPS's
    ``PeptidesFunctionalDataset`` / ``PeptidesStructuralDataset`` leave it after processing the
    download: ``processed/geometric_data_processed.pt`` (``(data, slices)``), the split pickle of
    numpy index arrays, the release-tag file, and a raw CSV (never read once ``processed`` exists;
    it has the columns of the real one, with empty SMILES). The graphs are those of
    :func:`torch_geometric_chimera.lrgb.write_fixture`. Pass ``root`` as ``dataset.dir``."""
    import gzip

    import numpy as np
    from torch_geometric.data import Data, InMemoryDataset

    from ..lrgb import write_fixture
    if name not in PEPTIDES_FORMAT:
        raise ValueError(f"name: expected one of {sorted(PEPTIDES_FORMAT)}, got {name!r}")
    raw_name, release, split_name, num_targets = PEPTIDES_FORMAT[name]
    folder = os.path.join(root, name)
    lrgb_name = "peptides-func" if name == "peptides-functional" else "peptides-struct"
    data_list, split = [], {}
    with tempfile.TemporaryDirectory() as source:
        write_fixture(source, lrgb_name, graphs_per_split, seed)
        for part in ("train", "val", "test"):
            graphs = torch.load(os.path.join(source, lrgb_name, "raw", f"{part}.pt"))
            split[part] = np.arange(len(data_list), len(data_list) + len(graphs))
            for x, edge_attr, edge_index, y in graphs:
                data_list.append(Data(x=x, edge_index=edge_index, edge_attr=edge_attr, y=y.float().view(1, -1)))
            assert data_list[-1].y.size(1) == num_targets
    os.makedirs(os.path.join(folder, "processed"), exist_ok=True)
    os.makedirs(os.path.join(folder, "raw"), exist_ok=True)
    torch.save(InMemoryDataset.collate(data_list), os.path.join(folder, "processed", "geometric_data_processed.pt"))
    with open(os.path.join(folder, split_name), "wb") as f:
        pickle.dump(split, f)
    open(os.path.join(folder, release), "w").close()
    with gzip.open(os.path.join(folder, "raw", raw_name), "wt") as f:
        if name == "peptides-functional":
            f.write("smiles,labels\n" + "".join(f",\"{d.y[0].tolist()}\"\n" for d in data_list))
        else:
            f.write("smiles\n" + "\n" * len(data_list))
    return root


def find_graphgps(path: Optional[str] = None) -> str:
    """The GraphGPS checkout: ``path``, else ``$GRAPHGPS_DIR``, else the working directory; it must
    hold ``main.py`` and ``graphgps/``."""
    candidates = [("--graphgps-dir", path), ("GRAPHGPS_DIR", os.environ.get("GRAPHGPS_DIR")),
                  ("the working directory", os.getcwd())]
    for source, candidate in candidates:
        if candidate:
            candidate = os.path.abspath(candidate)
            if os.path.isfile(os.path.join(candidate, "main.py")) and os.path.isdir(os.path.join(candidate,
                                                                                                 "graphgps")):
                return candidate
            if source != "the working directory":
                raise ValueError(f"{source}: expected a checkout of rampasek/GraphGPS (main.py and graphgps/), "
                                 f"got {candidate!r}")
    raise ValueError("graphgps-dir: no GraphGPS checkout found; pass --graphgps-dir, set GRAPHGPS_DIR or run from "
                     "the checkout")
