"""The configs/l2e overlays load on top of their Pythia config and say what their name says."""
import glob
import os

import pytest

from megatron.config import NeoXArgs

ROOT = os.path.join(os.path.dirname(__file__), "..", "..")
SIZES = {"70M": 1e-11, "410M": 1e-10, "2-8B": 1e-9}
EXPECTED = {  # variant -> fields that differ from the paper's L2E
    "l2e": {}, "rate1": {"rate": 0.01}, "rate3": {"rate": 0.03}, "mid_third": {"layers": "mid_third"},
    "top_bottom": {"layers": "top_bottom"}, "no_thr": {"retrieval": "topk"},
    "rd": {"inhibition": "reverse_deactivation"}, "monitor": {"inhibition": "none"},
}


@pytest.mark.parametrize("size", SIZES)
def test_overlays_match_the_paper(size):
    files = sorted(glob.glob(os.path.join(ROOT, "configs", "l2e", size, "*.yml")))
    assert {os.path.basename(f)[:-4] for f in files} == set(EXPECTED)
    for path in files:
        args = NeoXArgs.from_ymls([os.path.join(ROOT, "configs", "pythia", f"{size}.yml"), path])
        l2e = args.l2e
        want = {"enabled": True, "layers": "mid2", "rate": 0.02, "loss_weight": SIZES[size],
                "retrieval": "moving_threshold", "inhibition": "regularize", "site": "block_output",
                "threshold_update": "additive", "threshold_lr": 1.0, "stats_momentum": 1.0,  # eq. 6, cumulative
                **EXPECTED[os.path.basename(path)[:-4]]}
        assert {k: getattr(l2e, k) for k in want} == want, path
    L = NeoXArgs.from_ymls([os.path.join(ROOT, "configs", "pythia", f"{size}.yml")]).num_layers
    assert len(l2e.resolve_layers(L)) == 2


@pytest.mark.parametrize("size", SIZES)
def test_paper_launch_commands_load(size):
    """Every table row is one launch: Pythia + local_setup + overlay + the 14.3k-step overrides."""
    pythia = os.path.join(ROOT, "configs", "pythia", f"{size}.yml")
    setup = os.path.join(ROOT, "configs", "local_setup.yml")
    schedule = {"train_iters": 14300, "lr_decay_iters": 14300}
    for path in sorted(glob.glob(os.path.join(ROOT, "configs", "l2e", size, "*.yml"))):
        args = NeoXArgs.from_ymls([pythia, setup, path], overrides=schedule)
        assert (args.train_iters, args.lr_decay_iters) == (14300, 14300)
        assert args.l2e.enabled
    dropout = NeoXArgs.from_ymls([pythia, setup], overrides={**schedule, "hidden_dropout": 0.2})
    assert dropout.hidden_dropout == 0.2 and not dropout.l2e.enabled
