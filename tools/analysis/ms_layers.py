"""Paper Fig. 5: mean φ_ℓ* of the sampled neurons, per layer and model.

    python tools/analysis/ms_layers.py --activations acts/70m acts/410m --out figs
"""
import argparse

import _common

from megatron.analysis import ms_layers
from megatron.analysis.plots import plot_ms_layers
from megatron.errors import cli_main


@cli_main
def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    _common.add_io_args(p)
    args = p.parse_args(argv)
    _common.run_study("ms_layers", ms_layers, plot_ms_layers, args.activations, args.out)


if __name__ == "__main__":
    main()
