"""Chimera beside GraphGPS (rampasek/GraphGPS).

(a) Without GraphGPS's code (CI): registration without clashes in either import order, defaults
    left alone, the GPS-layer / local-model choice, metric and loss names, the compatibility fixes
    and the fixtures in GraphGPS's format.
(b) With a GraphGPS checkout in ``GRAPHGPS_DIR``: GraphGPS's own ``main.py`` for one epoch through
    ``python -m torch_geometric_chimera.graphgym.graphgps_main`` on fixtures in GraphGPS's format,
    and GraphGPS's ``GPSLayer`` running Chimera on the graph (skipped otherwise, with the reason).
"""
import importlib.util
import json
import os
import pickle
import re
import subprocess
import sys
import textwrap
import types
import warnings

import pytest
import torch

pytest.importorskip("yacs")
pytest.importorskip("pytorch_lightning")

import torch_geometric_chimera.graphgym as gg  # noqa: E402
from torch_geometric.graphgym import register  # noqa: E402
from torch_geometric.graphgym.config import cfg, set_cfg  # noqa: E402
from yacs.config import CfgNode  # noqa: E402

from torch_geometric_chimera.graphgym import graphgps as ggps  # noqa: E402
from torch_geometric_chimera.graphgym.graphgps_main import _map_metric_names, main as graphgps_main  # noqa: E402
from torch_geometric_chimera.lrgb import average_precision, mean_absolute_error  # noqa: E402

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
GRAPHGPS_DIR = os.environ.get("GRAPHGPS_DIR")

# What GraphGPS (commit 2801570) registers where it meets this extension: its ``gt`` group (replaced
# whole, with these defaults), two losses, and a master loader that raises on formats it does not know.
GRAPHGPS_STANDIN = textwrap.dedent('''
    from torch_geometric.graphgym.config import cfg
    from torch_geometric.graphgym.register import register_config, register_loader, register_loss
    from yacs.config import CfgNode

    @register_config("cfg_gt")
    def set_cfg_gt(c):
        c.gt = CfgNode()
        c.gt.layer_type, c.gt.layers, c.gt.n_heads, c.gt.dim_hidden = "SANLayer", 3, 8, 64
        c.gt.dropout, c.gt.attn_dropout, c.gt.layer_norm, c.gt.batch_norm = 0.0, 0.0, False, True
        c.gt.full_graph = True

    @register_loss("weighted_cross_entropy")
    def weighted_cross_entropy(pred, true):
        if cfg.model.loss_fun == "weighted_cross_entropy":
            return "graphgps weighted_cross_entropy", pred

    @register_loss("l1_losses")
    def l1_losses(pred, true):
        if cfg.model.loss_fun == "l1":
            return "graphgps l1", pred

    @register_loader("custom_master_loader")
    def load_dataset_master(format, name, dataset_dir):
        raise ValueError(f"Unknown data format: {format}")
''')

# ----------------------------------------------------------------------------- (a) without GraphGPS
@pytest.fixture
def gt_cfg():
    set_cfg(cfg)
    yield cfg
    cfg.pop("gt", None)  # a stand-in's group: set_cfg would keep it
    set_cfg(cfg)


REGISTRIES = ("config_dict", "loss_dict", "loader_dict", "metric_dict", "network_dict", "layer_dict", "head_dict",
              "node_encoder_dict", "edge_encoder_dict")


def _import_extension_again():
    """Runs this extension's GraphGym module once more, as a first import would."""
    spec = importlib.util.spec_from_file_location("torch_geometric_chimera.graphgym", gg.__file__)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("graphgps_first", [True, False])
def test_import_beside_graphgps_in_either_order(gt_cfg, monkeypatch, graphgps_first):
    for name in REGISTRIES:  # registries as before either import (GraphGym's own entries only)
        monkeypatch.setattr(register, name, {key: value for key, value in getattr(register, name).items()
                                             if not gg._is_ours(value)})
    monkeypatch.setattr(gg, "_warned", set())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        if graphgps_first:
            exec(GRAPHGPS_STANDIN, {"__name__": "graphgps_standin"})
            ours = _import_extension_again()
        else:
            ours = _import_extension_again()
            exec(GRAPHGPS_STANDIN, {"__name__": "graphgps_standin"})  # raised KeyError('weighted_cross_entropy') before
    assert not [w for w in caught if "torch_geometric_chimera" in str(w.message)]
    set_cfg(cfg)
    # GraphGPS's defaults, untouched; GraphGPS's own keys kept; Chimera's group added
    assert (cfg.gt.layer_type, cfg.gt.layers, cfg.gt.n_heads, cfg.gt.dropout, cfg.gt.layer_norm,
            cfg.gt.batch_norm, cfg.gt.full_graph) == ("SANLayer", 3, 8, 0.0, False, True, True)
    assert cfg.chimera.gps_layer == "auto" and cfg.chimera.norm_style == "post"
    # GraphGPS's losses answer, whichever module came first
    from torch_geometric.graphgym.loss import compute_loss
    pred, true = torch.randn(6, 3), torch.tensor([0, 1, 2, 0, 1, 1])
    cfg.model.loss_fun = "weighted_cross_entropy"
    assert compute_loss(pred, true)[0] == "graphgps weighted_cross_entropy"
    cfg.model.loss_fun = "l1"
    assert compute_loss(pred, true.float())[0] == "graphgps l1"
    # the extension's loader is asked before GraphGPS's master loader, which raises on it
    assert register.loader_dict["ChimeraLRGB"] is ours.load_lrgb
    from torch_geometric.graphgym.loader import load_dataset
    cfg.dataset.format, cfg.dataset.name = "ChimeraLRGB", "peptides-mini"
    assert len(load_dataset()) > 0
    assert register.network_dict["ChimeraGPSModel"] is ours.ChimeraGPSModel


def test_register_skips_a_taken_name_and_warns_once(monkeypatch):
    monkeypatch.setattr(gg, "_warned", set())
    registry = {"ChimeraAtom": "another module's encoder"}
    with pytest.warns(UserWarning, match="node encoder 'ChimeraAtom' is already registered by .*skipping Chimera's"):
        gg._register(registry, "node encoder", "ChimeraAtom", gg.AtomEncoder)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        gg._register(registry, "node encoder", "ChimeraAtom", gg.AtomEncoder)  # no second warning
    assert registry["ChimeraAtom"] == "another module's encoder"
    gg._register(registry, "node encoder", "free name", gg.AtomEncoder)
    assert registry["free name"] is gg.AtomEncoder


def test_config_adds_only_missing_keys(gt_cfg):
    c = CfgNode()
    c.gt = CfgNode()  # another module's (GraphGPS's) group
    c.gt.layers, c.gt.n_heads, c.gt.dropout, c.gt.layer_norm, c.gt.batch_norm = 5, 2, 0.3, True, False
    gg.set_cfg_chimera(c)
    assert (c.gt.layers, c.gt.n_heads, c.gt.dropout, c.gt.layer_norm, c.gt.batch_norm) == (5, 2, 0.3, True, False)
    assert c.gt.layer_type == "GCN+Chimera" and c.chimera.state_dim == 64
    fresh = CfgNode()
    gg.set_cfg_chimera(fresh)  # without GraphGPS: GraphGPS's values, so a YAML means the same model
    assert (fresh.gt.layers, fresh.gt.n_heads, fresh.gt.dropout, fresh.gt.layer_norm, fresh.gt.batch_norm) == \
        (3, 8, 0.0, False, True)
    # a group this module created is its own: GraphGym's set_cfg resets it, as every other group
    gt_cfg.gt.layers, gt_cfg.chimera.state_dim = 11, 8
    set_cfg(gt_cfg)
    assert (gt_cfg.gt.layers, gt_cfg.chimera.state_dim) == (3, 64)


def test_gps_layer_choice(gt_cfg, monkeypatch):
    monkeypatch.delitem(sys.modules, "graphgps", raising=False)
    gt_cfg.gt.layer_type = "GINE+Chimera"
    assert gg.gps_layer_kind() == "pyg"  # auto, without GraphGPS
    gt_cfg.gt.layer_type = "CustomGatedGCN+Chimera"
    with pytest.raises(ValueError, match="gt.layer_type: .*GraphGPS's local models .*graphgps_main"):
        gg.gps_layer_kind()
    monkeypatch.setitem(sys.modules, "graphgps", types.ModuleType("graphgps"))
    assert gg.gps_layer_kind() == "graphgps"  # auto, inside GraphGPS
    gt_cfg.chimera.norm_style = "pre"
    with pytest.raises(ValueError, match="chimera.norm_style: GraphGPS's GPSLayer"):
        gg.gps_layer_kind()
    gt_cfg.chimera.norm_style, gt_cfg.chimera.gps_layer = "post", "pyg"
    with pytest.raises(ValueError, match="<local> one of"):
        gg.gps_layer_kind()
    gt_cfg.chimera.gps_layer = "graph_gps"
    with pytest.raises(ValueError, match="chimera.gps_layer: expected one of"):
        gg.gps_layer_kind()
    gt_cfg.gt.layer_type = "CustomGatedGCN+Transformer"
    with pytest.raises(ValueError, match="gt.layer_type: expected '<local>\\+Chimera'"):
        gg.gps_layer_kind()


def test_graphgps_layer_without_graphgps_is_a_clear_error(gt_cfg, monkeypatch):
    monkeypatch.setitem(sys.modules, "graphgps", None)  # not importable
    monkeypatch.setattr(ggps, "_LAYER_CLASS", None)
    gt_cfg.gt.layer_type, gt_cfg.chimera.gps_layer = "CustomGatedGCN+Chimera", "graphgps"
    gt_cfg.model.type, gt_cfg.accelerator = "ChimeraGPSModel", "cpu"
    gt_cfg.share.dim_in, gt_cfg.share.dim_out = 1, 10
    from torch_geometric.graphgym.model_builder import create_model
    with pytest.raises(ValueError, match="chimera.gps_layer: .*needs GraphGPS's 'graphgps' package"):
        create_model()


def test_metric_names_are_graphgps_logger_names(gt_cfg):
    true = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    pred = torch.tensor([[0.9, 0.2], [0.1, 0.3], [0.7, 0.8]])
    for name in ("ap", "mae", "f1", "lrgb_ap", "lrgb_mae", "lrgb_f1"):
        assert register.metric_dict[name] is getattr(gg, name.replace("lrgb_", ""))
    assert register.metric_dict["ap"]([true], [pred], "classification_multilabel") == \
        round(average_precision(true, pred), cfg.round)
    assert register.metric_dict["mae"]([true], [pred], "regression") == \
        round(mean_absolute_error(true, pred), cfg.round)
    # the entry point maps the older names for GraphGPS's own loop, which ignores custom_metrics
    load = _map_metric_names(lambda c, args: None)
    gt_cfg.train.mode, gt_cfg.metric_best = "custom", "lrgb_mae"
    load(gt_cfg, None)
    assert gt_cfg.metric_best == "mae"
    gt_cfg.train.mode, gt_cfg.metric_best = "standard", "lrgb_f1"
    load(gt_cfg, None)
    assert gt_cfg.metric_best == "lrgb_f1"


def test_losses_step_aside_for_graphgps(gt_cfg, monkeypatch):
    pred, true = torch.randn(8, 3), torch.tensor([0, 1, 2, 2, 1, 0, 0, 0])
    gt_cfg.model.loss_fun = "weighted_cross_entropy"
    loss, _ = gg.weighted_cross_entropy(pred, true)
    weight = torch.tensor([4.0, 6.0, 6.0]) / 8  # (N - count) / N
    assert torch.allclose(loss, torch.nn.functional.cross_entropy(pred, true, weight=weight))
    monkeypatch.setitem(register.loss_dict, "weighted_cross_entropy", lambda pred, true: None)
    assert gg.weighted_cross_entropy(pred, true) is None
    gt_cfg.model.loss_fun = "l1"
    loss, returned = gg.l1_loss(pred[:, 0], true.float())
    assert torch.allclose(loss, torch.nn.functional.l1_loss(pred[:, 0], true.float()))
    assert torch.equal(returned, pred[:, 0])
    monkeypatch.setitem(register.loss_dict, "l1_losses", lambda pred, true: None)
    assert gg.l1_loss(pred[:, 0], true.float()) is None


def test_chimera_loader_first_and_no_silent_missing_encodings(gt_cfg, monkeypatch):
    assert next(iter(register.loader_dict)) == "ChimeraLRGB"
    assert gg.load_lrgb("OGB", "peptides-functional", "x") is None  # other formats: declined
    monkeypatch.setitem(gt_cfg, "posenc_LapPE", CfgNode({"enable": True}))
    with pytest.raises(ValueError, match="dataset.format: 'ChimeraLRGB' computes no positional encodings"):
        gg.load_lrgb("ChimeraLRGB", "peptides-mini", None)


def test_chimera_loader_takes_graphgps_names(lrgb_root, gt_cfg):
    dataset = gg.load_lrgb("ChimeraLRGB", "peptides-functional", lrgb_root)
    assert len(dataset) == 24 and dataset[0].y.shape == (1, 10)  # the 12 + 6 + 6 graphs of peptides-func
    assert gg.load_lrgb("ChimeraLRGB", "peptides-structural", lrgb_root)[0].y.shape == (1, 11)


def test_torch_scatter_standin_matches_reference():
    ts = ggps.torch_scatter_standin()
    src = torch.tensor([[1.0, -2.0], [3.0, 5.0], [-1.0, 0.5], [2.0, 2.0]])
    index = torch.tensor([0, 2, 0, 2])
    expected = torch.zeros(4, 2).index_add_(0, index, src)
    assert torch.equal(ts.scatter(src, index, 0, None, 4, reduce="sum"), expected)  # GatedGCN's call
    assert torch.equal(ts.scatter_add(src, index, dim=0, dim_size=4), expected)
    assert torch.equal(ts.scatter(src, index.view(-1, 1).expand_as(src), 0, dim_size=4), expected)
    values, argmax = ts.scatter_max(src, index, dim=0, dim_size=4)
    assert torch.equal(values[[0, 2]], torch.tensor([[1.0, 0.5], [3.0, 5.0]]))
    assert torch.equal(argmax, torch.tensor([[0, 2], [4, 4], [1, 1], [4, 4]]))  # empty group: src.size(0)


@pytest.fixture
def restore_safe_globals():
    before = list(torch.serialization.get_safe_globals())
    yield
    torch.serialization.clear_safe_globals()
    torch.serialization.add_safe_globals(before)


def test_compat_fixes(tmp_path, monkeypatch, restore_safe_globals):
    from torch_geometric.data import Data, InMemoryDataset
    torch.serialization.clear_safe_globals()
    monkeypatch.setitem(sys.modules, "torch_scatter", None)  # as when it is not installed
    logger = types.ModuleType("graphgps.logger")
    logger.mean_squared_error = lambda y_true, y_pred: 4.0  # scikit-learn >= 1.6: no `squared`
    monkeypatch.setitem(sys.modules, "graphgps.logger", logger)
    path = tmp_path / "geometric_data_processed.pt"
    torch.save(InMemoryDataset.collate([Data(x=torch.ones(2, 3), edge_index=torch.tensor([[0], [1]]))]), path)
    with pytest.raises(Exception, match="Weights only load failed"):
        torch.load(path)
    lines = []
    fixes = ggps.apply_compat_fixes(log=lines.append)
    assert len(lines) == len(fixes) >= 3
    assert all(line.startswith("[torch_geometric_chimera] GraphGPS compatibility fix: ") for line in lines)
    data, slices = torch.load(path)
    assert isinstance(data, Data) and torch.equal(data.x, torch.ones(2, 3))
    import torch_scatter
    assert torch_scatter.__doc__.startswith("torch_scatter stand-in")
    assert logger.mean_squared_error(0, 0, squared=False) == 2.0 and logger.mean_squared_error(0, 0) == 4.0
    assert ggps.apply_compat_fixes(log=lines.append) == []  # each fix once


def test_write_graphgps_fixtures(tmp_path):
    graphgps_main(["--write-fixtures", str(tmp_path)])
    for name, (raw, release, split_file, targets) in ggps.PEPTIDES_FORMAT.items():
        folder = tmp_path / name
        assert (folder / release).exists() and (folder / "raw" / raw).exists()
        with open(folder / split_file, "rb") as f:
            split = pickle.load(f)
        data, slices = torch.load(folder / "processed" / "geometric_data_processed.pt", weights_only=False)
        num_graphs = slices["x"].numel() - 1
        assert sorted(int(i) for part in ("train", "val", "test") for i in split[part]) == list(range(num_graphs))
        assert data.y.shape == (num_graphs, targets) and data.x.dtype == torch.long and data.x.size(1) == 9
        assert data.edge_attr.size(1) == 3


def test_find_graphgps_errors(tmp_path):
    with pytest.raises(ValueError, match="--graphgps-dir: expected a checkout of rampasek/GraphGPS"):
        ggps.find_graphgps(str(tmp_path))


# ----------------------------------------------------------------------------- (b) GraphGPS's main.py
def _readme_diff():
    readme = open(os.path.join(REPO, "README.md"), encoding="utf-8").read()
    section = readme.split("## Using Chimera from the GraphGPS repository", 1)[1]
    return re.search(r"```diff\n(.*?)```", section, re.S).group(1)


def _apply_diff(text, diff):
    """Applies a unified diff to ``text`` hunk by hunk, by content (each hunk must match once)."""
    for hunk in re.split(r"^@@.*@@\n", diff, flags=re.M)[1:]:
        lines = hunk.splitlines(True)
        old = "".join(line[1:] for line in lines if line[0] in " -")
        new = "".join(line[1:] for line in lines if line[0] in " +")
        assert text.count(old) == 1, old
        text = text.replace(old, new)
    return text


@pytest.mark.skipif(not GRAPHGPS_DIR, reason="GRAPHGPS_DIR is not set: this runs GraphGPS's main.py from a checkout "
                    "of rampasek/GraphGPS (not on PyPI); see the README section 'Using Chimera from the GraphGPS "
                    "repository'")
@pytest.mark.parametrize("task, overrides, local, metric", [
    ("peptides-func", [], "CustomGatedGCN", "ap"),  # GraphGPS's tuned YAML with the README's diff
    ("peptides-struct", ["model.type", "ChimeraGPSModel", "gt.layer_type", "GAT+Chimera"], "GAT", "mae"),
])
def test_graphgps_main_one_epoch(tmp_path, task, overrides, local, metric):
    text = open(os.path.join(GRAPHGPS_DIR, "configs", "GPS", f"{task}-GPS.yaml")).read()
    if not overrides:
        text = _apply_diff(text, _readme_diff())
    config = tmp_path / f"{task}-Chimera.yaml"
    config.write_text(text)
    data, out = tmp_path / "data", tmp_path / "results"
    env = dict(os.environ, PYTHONPATH=REPO)
    entry = [sys.executable, "-m", "torch_geometric_chimera.graphgym.graphgps_main"]
    subprocess.run([*entry, "--write-fixtures", str(data)], check=True, env=env, cwd=str(tmp_path))
    result = subprocess.run([*entry, "--graphgps-dir", GRAPHGPS_DIR, "--cfg", str(config), "dataset.dir", str(data),
                             "out_dir", str(out), "wandb.use", "False", "optim.max_epoch", "1", "train.batch_size", "8",
                             "gt.layers", "2", *overrides], capture_output=True, text=True, env=env, cwd=str(tmp_path),
                            timeout=600)
    log = result.stdout + result.stderr
    assert result.returncode == 0, log[-5000:]
    assert f"local_gnn_type={local}, global_model_type=Chimera" in log
    assert log.count("(self_attn): ChimeraConv(96, heads=4") == 2
    assert "Positional Encoding statistics: ['LapPE']" in log  # GraphGPS's loader and encodings
    assert "GraphGPS compatibility fix" in log
    for split in ("train", "val", "test"):
        with open(out / f"{task}-Chimera" / "0" / split / "stats.json") as f:
            stats = [json.loads(line) for line in f]
        assert len(stats) == 1 and stats[0]["epoch"] == 0 and 0 <= stats[0][metric] < 10
        assert stats[0]["params"] > 0


@pytest.mark.skipif(not GRAPHGPS_DIR, reason="GRAPHGPS_DIR is not set: this builds GraphGPS's GPSLayer from a checkout "
                    "of rampasek/GraphGPS (not on PyPI)")
def test_graphgps_layer_runs_chimera_on_the_graph():
    code = textwrap.dedent('''
        import sys, torch
        from torch_geometric.data import Batch, Data
        from torch_geometric.utils import to_dense_batch
        from torch_geometric_chimera.graphgym.graphgps import apply_compat_fixes
        sys.path.insert(0, sys.argv[1])
        apply_compat_fixes(log=lambda line: None)
        import graphgps  # noqa: F401
        import torch_geometric_chimera.graphgym  # noqa: F401
        from torch_geometric.graphgym.config import cfg, set_cfg
        from torch_geometric_chimera.graphgym.graphgps import graphgps_chimera_layer
        set_cfg(cfg)
        cfg.gt.layer_type, cfg.gt.n_heads, cfg.chimera.state_dim = "CustomGatedGCN+Chimera", 2, 8
        cfg.dataset.edge_encoder, cfg.gnn.dim_inner = True, 16
        torch.manual_seed(0)
        layer = graphgps_chimera_layer(16).eval()
        graphs = [Data(x=torch.randn(n, 16), edge_index=torch.randint(0, n, (2, 2 * n)),
                       edge_attr=torch.randn(2 * n, 16)) for n in (5, 3)]
        batch = Batch.from_data_list(graphs)
        direct = layer.self_attn(batch.x, batch.edge_index, batch.edge_attr, batch.batch)
        dense, mask = to_dense_batch(batch.x, batch.batch)
        layer._graph = (batch.edge_index, batch.edge_attr, batch.batch)
        through_gps = layer._sa_block(dense, None, ~mask)[mask]
        layer._graph = None
        out = layer(batch.clone()).x
        print(torch.allclose(direct, through_gps, atol=1e-6), tuple(out.shape), bool(torch.isfinite(out).all()),
              type(layer).__mro__[1].__module__, "global_model_type=Chimera" in repr(layer))
    ''')
    result = subprocess.run([sys.executable, "-c", code, GRAPHGPS_DIR], capture_output=True, text=True,
                            env=dict(os.environ, PYTHONPATH=REPO), timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.split() == ["True", "(8,", "16)", "True", "graphgps.layer.gps_layer", "True"]
