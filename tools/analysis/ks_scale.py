"""Paper Fig. 4: K-S statistic of MS(ℓ*) vs MS(all) over random neurons, one bar per model
(grouped by the feature dataset the activations were collected on).

    python tools/analysis/ks_scale.py --activations acts/lang/70m acts/lang/410m acts/code/70m ... --out figs
"""
import argparse

import _common

from megatron.analysis import ks_scale
from megatron.analysis.plots import plot_ks
from megatron.errors import cli_main


@cli_main
def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    _common.add_io_args(p)
    p.add_argument("--neurons", type=int, default=1000, help="random neurons per model")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    _common.run_study("ks_scale", ks_scale, plot_ks, args.activations, args.out,
                      num_neurons=args.neurons, seed=args.seed)


if __name__ == "__main__":
    main()
