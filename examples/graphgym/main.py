"""Train a GraphGym / GraphGPS-style YAML configuration with Chimera registered.

    python examples/graphgym/main.py --cfg examples/graphgym/peptides-func.yaml dataset.dir data/lrgb
    python examples/graphgym/main.py --cfg examples/graphgym/peptides-struct.yaml --repeat 4

GraphGym's own pipeline (config, create_model, its PyTorch Lightning training loop and logger):
importing ``torch_geometric_chimera.graphgym`` is what makes ``ChimeraGPSModel``, ``GCN+Chimera``
and the ``ChimeraLRGB`` loader known to it. Needs ``pip install yacs pytorch_lightning``.
To run the GraphGPS repository's own ``main.py`` instead, see
``python -m torch_geometric_chimera.graphgym.graphgps_main`` (README, "Using Chimera from the GraphGPS
repository").
"""
import argparse

import torch_geometric_chimera.graphgym  # noqa: F401  (registers Chimera with GraphGym)
from torch_geometric import seed_everything
from torch_geometric.graphgym.config import cfg, dump_cfg, load_cfg, set_cfg, set_out_dir, set_run_dir
from torch_geometric.graphgym.model_builder import create_model
from torch_geometric.graphgym.train import GraphGymDataModule, train
from torch_geometric.graphgym.utils.agg_runs import agg_runs
from torch_geometric.graphgym.utils.comp_budget import params_count
from torch_geometric.graphgym.utils.device import auto_select_device


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cfg", dest="cfg_file", required=True, help="the YAML configuration")
    parser.add_argument("--repeat", type=int, default=1, help="runs with seeds cfg.seed, cfg.seed + 1, ...")
    parser.add_argument("opts", default=[], nargs=argparse.REMAINDER, help="KEY VALUE overrides, as GraphGym")
    args = parser.parse_args(argv)
    set_cfg(cfg)  # start from the defaults (and the registered groups), then the YAML, then the overrides
    load_cfg(cfg, args)
    set_out_dir(cfg.out_dir, args.cfg_file)
    dump_cfg(cfg)
    auto_select_device()  # cfg.accelerator 'auto' -> 'cuda' or 'cpu', as GraphGym's own main does
    first_seed = cfg.seed
    for i in range(args.repeat):
        cfg.seed = first_seed + i
        set_run_dir(cfg.out_dir)
        seed_everything(cfg.seed)
        datamodule = GraphGymDataModule()
        model = create_model()
        cfg.params = params_count(model)
        print(f"{cfg.dataset.name}: {cfg.params:,} parameters, seed {cfg.seed}")
        train(model, datamodule, logger=True,
              trainer_config={"enable_progress_bar": True, "enable_model_summary": False})
    agg_runs(cfg.out_dir, cfg.metric_best)
    return cfg.out_dir


if __name__ == "__main__":
    main()
