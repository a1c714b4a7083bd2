"""What is done to the selected neurons: the MS regularizer (paper eq. 5) or Reverse Deactivation.

Regularization (L2E, ``inhibition: regularize``):

    L_MS = lambda * sum_{(i,j) selected} log((z_ij - zbar_j)^2 + eps)         (eq. 5)

with zbar detached, so dL_MS/dz_ij = lambda * 2 (z_ij - zbar_j) / ((z_ij - zbar_j)^2 + eps)
on the selected elements and 0 elsewhere. Rather than adding L_MS to the final loss (which
a middle pipeline stage never sees) an identity autograd function carries this gradient and
adds it, times ``grad_scale``, to whatever gradient reaches the site in backward. With
grad_scale = loss_scale / grad_accum the result equals backpropagating lm_loss + L_MS
through one forward and one backward, under gradient accumulation, ZeRO and pipelining.

Tensor parallelism: the block output is replicated on the tp ranks and its gradient must
stay identical there, so each rank's slice of dL_MS/dz is all-gathered into the full
gradient before it is added. The MLP activation (``site: mlp_act``) is already sharded:
each rank adds its own slice.

Reverse Deactivation (MEmeL's inhibition, a RECONSTRUCTION from its stated idea, see
l2e_baselines.md): forward replaces a selected element by its running mean (the neuron is
deactivated); backward negates the gradient reaching it.
"""
from __future__ import annotations

import torch

from megatron.l2e.comm import all_gather_last_dim


def ms_grad_shape(d: torch.Tensor, d2: torch.Tensor, mask: torch.Tensor, eps: float):
    """dL_MS/dz / (2 lambda) for deviations d = z - zbar (fp32), zero off the selection."""
    return torch.where(mask, d / (d2 + eps), 0.0)


def ms_loss_value(d2: torch.Tensor, mask: torch.Tensor, loss_weight: float, eps: float) -> torch.Tensor:
    """L_MS of eq. 5 (detached), for logging."""
    return loss_weight * torch.where(mask, torch.log(d2 + eps), 0.0).sum()


class GradProbe:
    """Squared norms of the added and of the incoming gradient, summed over backward calls."""

    def __init__(self):
        self.added_sq = 0.0
        self.incoming_sq = 0.0

    def record(self, added: torch.Tensor, incoming: torch.Tensor) -> None:
        self.added_sq = self.added_sq + added.float().square().sum()
        self.incoming_sq = self.incoming_sq + incoming.float().square().sum()


class AddMSGradient(torch.autograd.Function):
    """Identity in forward; backward adds alpha * g to the incoming gradient, where
    alpha * g = grad_scale * dL_MS/dz (eq. 5) with alpha = 2 lambda grad_scale.

    ``g`` covers the rank's slice of z: the channels [lo, hi) when ``tp_group`` is set (it
    is gathered to the full width in backward), else all of z.
    """

    @staticmethod
    def forward(ctx, z, g, alpha, tp_group, lo, hi, probe):
        ctx.save_for_backward(g)
        ctx.alpha, ctx.tp_group, ctx.lo, ctx.hi, ctx.probe = alpha, tp_group, lo, hi, probe
        return z.view_as(z)

    @staticmethod
    def backward(ctx, grad_out):
        (g,) = ctx.saved_tensors
        if ctx.probe is not None:
            ctx.probe.record(g * ctx.alpha, grad_out[..., ctx.lo:ctx.hi])
        g_full = all_gather_last_dim(g, ctx.tp_group).to(grad_out.dtype)
        return grad_out.add(g_full, alpha=ctx.alpha), None, None, None, None, None, None


class ReverseDeactivation(torch.autograd.Function):
    """Forward z' = where(mask, mean, z); backward dL/dz = where(mask, -dL/dz', dL/dz')."""

    @staticmethod
    def forward(ctx, z, mask, mean):
        ctx.save_for_backward(mask)
        return torch.where(mask, mean.to(z.dtype), z)

    @staticmethod
    def backward(ctx, grad_out):
        (mask,) = ctx.saved_tensors
        return torch.where(mask, -grad_out, grad_out), None, None


def regularize(z, d, d2, mask, *, loss_weight, eps, grad_scale, tp_group, lo, hi, probe=None):
    g = ms_grad_shape(d, d2, mask, eps)
    return AddMSGradient.apply(z, g, 2.0 * loss_weight * grad_scale, tp_group, lo, hi, probe)


def reverse_deactivate(z, mask, mean, tp_group):
    """Reverse Deactivation of the rank's slice; under tp the full mask/mean are gathered
    so the replicated output stays identical on every tp rank."""
    mask = all_gather_last_dim(mask, tp_group)
    mean = all_gather_last_dim(mean, tp_group)
    return ReverseDeactivation.apply(z, mask, mean.expand_as(z))
