"""neox-l2e: GPT-NeoX-compatible pretraining with L2E built in."""

__version__ = "0.1.0"


def load_model(path, **kwargs):
    """Load one of our checkpoints or an HF GPT-NeoX directory as an eval-mode CPU fp32 module.

    ``model(input_ids)`` returns logits ``[batch, seq, padded_vocab]``.
    """
    from megatron.checkpoint import load_model as _load_model

    return _load_model(path, **kwargs)
