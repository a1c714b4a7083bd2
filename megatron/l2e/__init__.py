"""L2E: inhibiting monosemantic neurons during pretraining (spec: docs/l2e.md).

    statistics.py  running moments and the Monosemanticity Score (eq. 1)
    retrieval.py   moving threshold (eq. 6) and top-k selection
    inhibition.py  MS regularizer (eq. 5), Reverse Deactivation, monitor-only
    metrics.py     what is logged
    controller.py  the `L2E` object the training loop drives

Imports only errors and console: it is attached to the model's blocks from outside and
driven by the training loop (``begin_step`` / ``end_step``).
"""
from megatron.l2e.controller import L2E, l2e_blocks

__all__ = ["L2E", "l2e_blocks"]
