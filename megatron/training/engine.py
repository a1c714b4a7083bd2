"""Build the model (plain, tensor-parallel or pipelined) and wrap it in a DeepSpeed engine.

Order matters and is fixed here: build this rank's layers one at a time, already
sharded and on the device (initial weights depend on the seed and layer index only, so
every parallel layout starts from the same weights without ever holding the whole
model), attach L2E to the blocks, add activation checkpointing (which must know L2E's
recompute context), then hand model + our optimizer + our schedule to
``deepspeed.initialize``.
"""
from __future__ import annotations

from dataclasses import dataclass

import deepspeed
import torch
import torch.nn.functional as F

from megatron.errors import ConfigError
from megatron.model import GPTNeoX
from megatron.parallel import (
    ColumnParallelLinear,
    LayerInit,
    RowParallelLinear,
    VocabParallelEmbedding,
    apply_activation_checkpointing,
    build_model,
    build_pipeline_module,
    layer_modules,
    local_blocks,
    vocab_parallel_cross_entropy,
)
from megatron.training.ds_config import build_ds_config
from megatron.training.norms import StepNorms
from megatron.training.optimizer import AnnealingLR, build_optimizer
from megatron.training.robustness import NonFiniteStepCheck


class SequentialGPTNeoX(torch.nn.Module):
    """The pp=0 module DeepSpeed sees: NeoX's state-dict keys ``sequential.{idx}.*``.

    ``sequential`` holds the model's own submodules under NeoX's pipeline layer indices
    (embed 0, block i at i+2, final norm L+3, head L+4), so ``engine.save_checkpoint``
    writes GPT-NeoX's pp=0 layout. The model itself is kept out of the module tree
    (its parameters would otherwise appear twice) and runs the forward pass.
    """

    def __init__(self, model: GPTNeoX):
        super().__init__()
        self.sequential = torch.nn.ModuleDict({str(idx): m for idx, m in layer_modules(model).items()})
        object.__setattr__(self, "model", model)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.model(tokens)


def lm_loss(logits: torch.Tensor, labels: torch.Tensor, loss_mask: torch.Tensor, tp_group=None) -> torch.Tensor:
    """Cross entropy in fp32, averaged over the loss mask (NeoX's loss)."""
    if tp_group is not None:
        per_token = vocab_parallel_cross_entropy(logits.float(), labels, tp_group)
    else:
        per_token = F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), reduction="none")
    mask = loss_mask.flatten().float()
    return (per_token.flatten() * mask).sum() / mask.sum().clamp(min=1.0)


def _pipe_loss_fn(tp_group):
    def loss_fn(logits, targets):
        labels, loss_mask = targets
        return lm_loss(logits, labels, loss_mask, tp_group)

    return loss_fn


@dataclass
class Trainer:
    """What the loop needs: the DeepSpeed engine, L2E (or None), and how to call them."""

    engine: object
    l2e: object = None
    is_pipe: bool = False
    model: torch.nn.Module = None  # the whole model on this rank (for lm-eval); None if pipelined
    tp_group: object = None
    step_check: object = None  # robustness.NonFiniteStepCheck: skips non-finite steps
    norms: StepNorms = None  # train/grad_norm and the per-parameter norms of each step


def _mark_for_grad_norm(model: torch.nn.Module, tp_rank: int, is_pipe: bool):
    """Flag the parameters whose gradients this rank must add to the global norm.

    DeepSpeed's clipping sums a gradient's squared norm on "model parallel" rank 0 and,
    on other ranks, only for parameters flagged ``model_parallel``. Its model-parallel
    group is the tp group for pp=0 but every stage and tp rank of a replica for
    pipelines. Each distinct tensor must be counted exactly once: tensor-parallel
    shards on every rank; everything else (norms, row-parallel bias shards, whose
    gradients are identical across tp ranks) on tp rank 0 of each stage.
    """
    sharded = set()
    for module in model.modules():
        if isinstance(module, (ColumnParallelLinear, VocabParallelEmbedding)):
            sharded.update(id(p) for p in module.parameters(recurse=False))
        elif isinstance(module, RowParallelLinear):
            sharded.add(id(module.weight))
    for p in model.parameters():
        if id(p) in sharded or (is_pipe and tp_rank == 0):
            p.model_parallel = True


def _use_foreach_clipping(engine, optimizer, step_check):
    """Swap DeepSpeed's per-parameter python loops for torch's foreach kernels.

    Only for fp32, ZeRO-0, pp=0, tp=1, where DeepSpeed clips every local gradient by the
    global norm: with no tensor shards the local norm is the global one (dp replicas
    hold identical, already-reduced grads), so ``clip_grad_norm_`` applies the same
    min(1, max_norm / (norm + 1e-6)) scaling, equal up to float rounding of the norm.
    Measured on the tiny bench shape (CPU, 2 threads): 1.04 -> 0.63 ms per step
    (DeepSpeed norms and scales one parameter at a time and all-reduces the norm twice).
    """
    params = [p for group in optimizer.param_groups for p in group["params"]]
    max_norm = engine.gradient_clipping()

    def clip():  # its norm is also the one the non-finite check needs: computed once
        step_check.known_norm = torch.nn.utils.clip_grad_norm_(params, max_norm, foreach=True)

    engine.clip_fp32_gradients = clip


def _attach_l2e(args, stage_blocks: dict, groups):
    """L2E hooks on the configured layers that live on this stage (None when disabled)."""
    if not args.l2e.enabled:
        return None
    from megatron.l2e import L2E, l2e_blocks

    blocks = l2e_blocks(stage_blocks, args.l2e, args.num_layers)
    return L2E.attach(blocks, args.l2e, seq_length=args.seq_length, hidden_size=args.hidden_size,
                      dp_group=groups.dp_group, tp_group=groups.tp_group)


def check_precision_supported(args):
    """fp16 needs hardware support that DeepSpeed's CPU accelerator often lacks."""
    from deepspeed.accelerator import get_accelerator

    if args.precision == "fp16" and not get_accelerator().is_fp16_supported():
        raise ConfigError(
            f"fp16.enabled: this {get_accelerator().device_name()} device cannot train in fp16; "
            "use bf16 ({\"bf16\": {\"enabled\": true}}) or remove the fp16 block for fp32"
        )


def build_trainer(args, groups) -> Trainer:
    """Model + L2E + DeepSpeed engine for this rank, ready for the loop."""
    check_precision_supported(args)
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    init = LayerInit(args.model_config(), groups, args.seed, device, per_rank_shards=args.init_per_rank_shards)
    tp_group = groups.tp_group if groups.tp_size > 1 else None
    is_pipe = args.pipe_parallel_size >= 1
    if is_pipe:
        model = build_pipeline_module(init, _pipe_loss_fn(tp_group), partition_method=args.pipe_partition_method)
    else:
        model = build_model(init)
    _mark_for_grad_norm(model, groups.tp_rank, is_pipe)
    blocks = local_blocks(model)
    l2e = _attach_l2e(args, blocks, groups)
    if args.checkpoint_activations:
        apply_activation_checkpointing(model, recompute_context=l2e.recompute_context if l2e else None)
    module = model if is_pipe else SequentialGPTNeoX(model)
    optimizer = build_optimizer(args, module, tp_size=groups.tp_size)
    scheduler = AnnealingLR.from_args(optimizer, args)
    engine, _, _, _ = deepspeed.initialize(
        model=module, optimizer=optimizer, lr_scheduler=scheduler, config=build_ds_config(args),
        mpu=None if is_pipe else groups.mpu,
    )
    if groups.dp_size == 1 and not is_pipe and engine.zero_optimization_stage() == 0:
        # Nothing to average over: skip DeepSpeed's flatten + all-reduce of every gradient
        # on a group of one (about 3% of a CPU step for the tiny model).
        engine.enable_backward_allreduce = False
    step_check = NonFiniteStepCheck(engine)
    if groups.tp_size == 1 and not is_pipe and engine.zero_optimization_stage() == 0 and args.precision == "fp32":
        _use_foreach_clipping(engine, optimizer, step_check)
    # A one-stage pipeline is still a plain callable model (pp=1, as in Pythia's configs).
    whole = not is_pipe or groups.pp_size == 1
    return Trainer(engine=engine, l2e=l2e, is_pipe=is_pipe, model=model if whole else None,
                   tp_group=tp_group, step_check=step_check, norms=StepNorms.attach(args, engine, groups))
