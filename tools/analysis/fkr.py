"""Paper Figs. 6 and 11: False Killing Rate over the inhibition rate ρ (minimum marked),
and per layer at one rate.

    python tools/analysis/fkr.py --activations acts/70m acts/410m --out figs [--rates 0.001 0.01 0.02 0.1]
"""
import argparse

import _common

from megatron.analysis import FKR_RATES, fkr
from megatron.analysis.plots import plot_fkr
from megatron.errors import UserError, cli_main


@cli_main
def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    _common.add_io_args(p)
    p.add_argument("--rates", type=float, nargs="+", default=list(FKR_RATES), help="fractions, e.g. 0.02 = 2%%")
    p.add_argument("--layer-rate", type=float, default=0.02, help="rate of the per-layer plot (Fig. 11)")
    args = p.parse_args(argv)
    if not all(0 < r < 1 for r in args.rates + [args.layer_rate]):
        raise UserError("--rates/--layer-rate are fractions in (0, 1), e.g. 0.02 for 2%")
    _common.run_study("fkr", fkr, plot_fkr, args.activations, args.out,
                      rates=args.rates, layer_rate=args.layer_rate)


if __name__ == "__main__":
    main()
