r"""Run GraphGPS's own ``main.py`` with Chimera registered first.

    python -m torch_geometric_chimera.graphgym.graphgps_main [--graphgps-dir DIR] --cfg FILE [KEY VALUE ...]
    python -m torch_geometric_chimera.graphgym.graphgps_main --write-fixtures ROOT

The GraphGPS checkout (``rampasek/GraphGPS``) is ``--graphgps-dir``, else ``$GRAPHGPS_DIR``, else the
working directory. In order, this

1. applies the compatibility fixes GraphGPS needs on current torch, PyG and scikit-learn
   (:func:`~torch_geometric_chimera.graphgym.graphgps.apply_compat_fixes`; each one applied is
   printed; none is about Chimera),
2. imports GraphGPS's ``graphgps`` package, then ``torch_geometric_chimera.graphgym`` (which adds
   only free names and missing config keys),
3. maps the extension's older metric names (``lrgb_ap``, ``lrgb_mae``, ``lrgb_f1``) in
   ``metric_best`` to the statistics GraphGPS's logger writes (``ap``, ``mae``, ``f1``),
4. runs ``main.py`` with the remaining arguments, unchanged.

``--write-fixtures ROOT`` writes small ``peptides-functional`` and ``peptides-structural`` fixtures in
GraphGPS's own on-disk format under ``ROOT`` (use it as ``dataset.dir``) and exits.
"""
import argparse
import importlib
import os
import runpy
import sys
from typing import List, Optional

# statistic names of GraphGPS's logger for the extension's metric names
GRAPHGPS_METRIC_NAMES = {"lrgb_ap": "ap", "lrgb_mae": "mae", "lrgb_f1": "f1"}


def _map_metric_names(load_cfg):
    def wrapped(cfg, args):
        load_cfg(cfg, args)
        # GraphGPS's own loop ("custom") writes its logger's statistics and ignores custom_metrics
        if cfg.train.mode != "standard" and cfg.metric_best in GRAPHGPS_METRIC_NAMES:
            name = GRAPHGPS_METRIC_NAMES[cfg.metric_best]
            print(f"[torch_geometric_chimera] metric_best: {cfg.metric_best!r} -> {name!r}, the name GraphGPS's "
                  f"logger gives it")
            cfg.metric_best = name
    return wrapped


def main(argv: Optional[List[str]] = None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], add_help=False)
    parser.add_argument("--graphgps-dir", default=None, help="the GraphGPS checkout (default: $GRAPHGPS_DIR, or .)")
    parser.add_argument("--write-fixtures", metavar="ROOT", default=None,
                        help="write peptides fixtures in GraphGPS's format under ROOT and exit")
    ours, rest = parser.parse_known_args(sys.argv[1:] if argv is None else argv)
    from .graphgps import PEPTIDES_FORMAT, apply_compat_fixes, find_graphgps, write_graphgps_peptides
    if ours.write_fixtures:
        for name in PEPTIDES_FORMAT:
            write_graphgps_peptides(ours.write_fixtures, name)
        print(f"[torch_geometric_chimera] wrote {sorted(PEPTIDES_FORMAT)} in GraphGPS's format under "
              f"{ours.write_fixtures} (use it as dataset.dir)")
        return None
    graphgps_dir = find_graphgps(ours.graphgps_dir)
    sys.path.insert(0, graphgps_dir)
    apply_compat_fixes()
    import graphgps  # noqa: F401  (GraphGPS registers its modules first)
    import graphgps.logger  # noqa: F401  (main.py imports it; the scikit-learn fix patches it)
    apply_compat_fixes()
    config = importlib.import_module("torch_geometric.graphgym.config")  # (the package re-binds 'config')

    from .. import graphgym  # noqa: F401
    print(f"[torch_geometric_chimera] Chimera registered with GraphGPS at {graphgps_dir}")
    load_cfg, argv_before = config.load_cfg, sys.argv
    config.load_cfg = _map_metric_names(load_cfg)
    main_py = os.path.join(graphgps_dir, "main.py")
    sys.argv = [main_py, *rest]
    try:
        runpy.run_path(main_py, run_name="__main__")
    finally:
        config.load_cfg, sys.argv = load_cfg, argv_before
    return graphgps_dir


if __name__ == "__main__":
    main()
