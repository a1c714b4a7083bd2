"""Single-neuron probing (Gurnee et al. 2023, k = 1): the top neurons by F1 per model
(paper App. B, Fig. 10), which ms_validation.py uses as the monosemantic neurons.

    python tools/analysis/probe.py --activations acts/70m acts/410m --out figs [--method logistic]
"""
import argparse

import _common

from megatron.analysis import probe
from megatron.analysis.plots import plot_probe
from megatron.analysis.probe import METHODS
from megatron.errors import cli_main


@cli_main
def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    _common.add_io_args(p)
    p.add_argument("--top", type=int, default=10)
    p.add_argument("--method", choices=METHODS, default="threshold")
    args = p.parse_args(argv)
    _common.run_study(_common.output_name("probe", args.method), probe, plot_probe, args.activations, args.out, top=args.top, method=args.method)


if __name__ == "__main__":
    main()
