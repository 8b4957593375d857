"""GraphGym's own config, create_model and (PyTorch Lightning) training loop with Chimera registered."""
import importlib.util
import json
import os

import pytest
import torch

pytest.importorskip("yacs")
pytest.importorskip("pytorch_lightning")

import torch_geometric_chimera.graphgym  # noqa: E402,F401  (the import registers Chimera)
from torch_geometric.graphgym import register  # noqa: E402
from torch_geometric.graphgym.config import cfg, set_cfg  # noqa: E402
from torch_geometric.graphgym.loader import create_loader  # noqa: E402
from torch_geometric.graphgym.model_builder import create_model  # noqa: E402

from torch_geometric_chimera import ChimeraConv, ChimeraGPSConv  # noqa: E402
from torch_geometric_chimera.lrgb import LRGB_TASKS, TASKS  # noqa: E402

REPO = os.path.join(os.path.dirname(__file__), "..", "..")
CONFIGS = os.path.join(REPO, "examples", "graphgym")
SMALL = ["gt.layers", "1", "gt.dim_hidden", "16", "gnn.dim_inner", "16", "chimera.state_dim", "8",
         "train.batch_size", "8", "optim.max_epoch", "1"]


def load_runner():
    spec = importlib.util.spec_from_file_location("graphgym_main", os.path.join(CONFIGS, "main.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module



def test_names_are_registered():
    assert register.network_dict["ChimeraGPSModel"] is torch_geometric_chimera.graphgym.ChimeraGPSModel
    assert "chimera" in register.layer_dict and "chimera" in register.config_dict
    for key in ("ChimeraAtom", "ChimeraSuperpixelNode"):
        assert key in register.node_encoder_dict
    for key in ("lrgb_ap", "lrgb_mae", "lrgb_f1"):
        assert key in register.metric_dict


@pytest.mark.parametrize("name", LRGB_TASKS)
def test_yaml_trains_one_epoch_with_graphgym(lrgb_root, tmp_path, name):
    out_dir = load_runner().main(["--cfg", os.path.join(CONFIGS, f"{name}.yaml"), "dataset.dir", lrgb_root,
                                  "out_dir", str(tmp_path), "train.enable_ckpt", "False", *SMALL])
    assert cfg.dataset.name == name and cfg.model.type == "ChimeraGPSModel"
    metric = TASKS[name].metric  # the name GraphGPS's logger gives the statistic too
    for split in ("train", "val", "test"):
        with open(os.path.join(out_dir, "0", split, "stats.json")) as f:
            stats = [json.loads(line) for line in f]
        # (Lightning's sanity check adds an earlier validation line)
        assert len(stats) == (2 if split == "val" else 1) and 0 <= stats[-1][metric] <= 10
    assert stats[-1]["params"] > 0


def test_yaml_hyperparameters_are_the_papers():
    set_cfg(cfg)
    cfg.merge_from_file(os.path.join(CONFIGS, "peptides-func.yaml"))
    assert (cfg.gt.layers, cfg.gt.dim_hidden, cfg.gt.n_heads, cfg.chimera.state_dim) == (8, 64, 2, 96)
    assert (cfg.optim.base_lr, cfg.gt.dropout, cfg.train.batch_size, cfg.chimera.norm_style) == (0.001, 0.1, 64, "pre")
    set_cfg(cfg)
    cfg.merge_from_file(os.path.join(CONFIGS, "coco-sp.yaml"))
    assert (cfg.optim.base_lr, cfg.gt.n_heads, cfg.chimera.state_dim, cfg.optim.max_epoch) == (0.0035, 4, 64, 200)


def test_full_size_model_is_within_the_500k_budget(lrgb_root):
    for name in LRGB_TASKS:
        set_cfg(cfg)
        cfg.merge_from_file(os.path.join(CONFIGS, f"{name}.yaml"))
        cfg.dataset.dir, cfg.accelerator = lrgb_root, "cpu"
        cfg.share.dim_in, cfg.share.dim_out = 1, 1  # the network takes the task's own output width
        model = create_model()
        assert sum(p.numel() for p in model.parameters()) <= 500_000
        layers = [m for m in model.modules() if isinstance(m, ChimeraGPSConv)]
        assert len(layers) == 8 and layers[0].chimera.state_dim == cfg.chimera.state_dim


def test_chimera_layer_in_graphgyms_stock_gnn(lrgb_root):
    set_cfg(cfg)
    cfg.merge_from_file(os.path.join(CONFIGS, "peptides-struct.yaml"))
    cfg.merge_from_list(["dataset.dir", lrgb_root, "model.type", "gnn", "gnn.layer_type", "chimera",
                         "gnn.layers_mp", "2", "gnn.dim_inner", "16", "gt.n_heads", "2", "chimera.state_dim", "8",
                         "accelerator", "cpu", "gnn.stage_type", "skipsum"])
    loaders = create_loader()
    model = create_model()
    assert sum(isinstance(m, ChimeraConv) for m in model.modules()) == 2
    pred, true = model(next(iter(loaders[0])))
    assert pred.shape == true.shape == (12, 11)  # the 12 training graphs of the fixture in one batch
    assert torch.isfinite(pred).all()


def test_chimera_transitions_key_reaches_every_layer(lrgb_root):
    set_cfg(cfg)
    assert cfg.chimera.transitions == "positive"
    for config in ("peptides-func.yaml", "peptides-struct.yaml"):
        set_cfg(cfg)
        cfg.merge_from_file(os.path.join(CONFIGS, config))
        cfg.merge_from_list(["dataset.dir", lrgb_root, "chimera.transitions", "signed", "accelerator", "cpu"])
        cfg.share.dim_in, cfg.share.dim_out = 1, 10
        convs = [m for m in create_model().modules() if isinstance(m, ChimeraConv)]
        assert convs and all(conv.transitions == "signed" for conv in convs)


def test_bad_layer_type(lrgb_root):
    set_cfg(cfg)
    cfg.merge_from_file(os.path.join(CONFIGS, "peptides-func.yaml"))
    cfg.merge_from_list(["gt.layer_type", "GCN+Transformer", "accelerator", "cpu"])
    cfg.share.dim_in, cfg.share.dim_out = 1, 10
    with pytest.raises(ValueError, match="gt.layer_type: expected '<local>\\+Chimera'"):
        create_model()
