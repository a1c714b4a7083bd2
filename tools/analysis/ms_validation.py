"""Paper Fig. 3: does MS agree with probing? φ_ℓ vs φ_ℓ⁻ of the top probed neurons (a),
and their φ_ℓ vs the φ_ℓ* of random neurons (b).

    python tools/analysis/ms_validation.py --activations acts/70m acts/410m --out figs
"""
import argparse

import _common

from megatron.analysis import ms_validation
from megatron.analysis.plots import plot_ms_validation
from megatron.analysis.probe import METHODS
from megatron.errors import cli_main


@cli_main
def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    _common.add_io_args(p)
    p.add_argument("--top", type=int, default=10, help="monosemantic neurons kept by probing F1")
    p.add_argument("--random", type=int, default=10, help="random neurons to compare with")
    p.add_argument("--method", choices=METHODS, default="threshold", help="probing classifier")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    _common.run_study(_common.output_name("ms_validation", args.method), ms_validation, plot_ms_validation, args.activations, args.out,
                      top=args.top, random=args.random, seed=args.seed, method=args.method)


if __name__ == "__main__":
    main()
