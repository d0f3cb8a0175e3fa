"""Fully sharded data parallel (`train.fsdp=true`) and the state dicts every checkpoint goes through.

Sharding is PyTorch's FSDP2 (`fully_shard`): each transformer block is one unit, the rest of the model is
the root's unit. Parameters, gradients and optimizer state are split over the processes; a block's weights
are gathered for its forward and backward only. It runs on NCCL (GPUs) and gloo (CPU processes) alike.
Under bf16 the weights are gathered in bf16 and gradients reduced in fp32.

Checkpoints hold full (unsharded) tensors whether or not a run is sharded (mae.train.state), so a run
resumes with or without sharding and on another number of processes.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

# Methods other than forward that run the model on their own (k-NN features); FSDP gathers the root's
# weights around them as it does around forward.
FORWARD_METHODS = ("forward_features", "forward_intermediates")


def enabled(cfg, num_processes: int) -> bool:
    """Whether a run shards its model: train.fsdp with more than one process (one has nothing to shard)."""
    return bool(cfg.train.fsdp) and num_processes > 1


def is_sharded(model: nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def shard(model: nn.Module, groups: list[dict], precision: str) -> list[dict]:
    """Shard `model` in place (every transformer block, then the root) and return the optimizer parameter
    groups with the sharded parameters in place of the originals (matched by name)."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method

    from mae.models.vit import Block

    if precision == "bf16":
        mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    else:
        mp = MixedPrecisionPolicy()
    for module in model.modules():
        if isinstance(module, Block):
            fully_shard(module, mp_policy=mp)
    fully_shard(model, mp_policy=mp)
    for name in FORWARD_METHODS:
        if hasattr(model, name):
            register_fsdp_forward_method(model, name)
    # The model's outputs include slices of larger tensors (pred without the cls row); nothing here
    # modifies them in place, which is what FSDP warns about on every forward.
    warnings.filterwarnings("ignore", message=r"FSDP2-wrapped module .* returned a view tensor")
    params = dict(model.named_parameters())
    return [{**g, "params": [params[n] for n in g["names"]]} for g in groups]


@contextmanager
def no_grad_sync(model: nn.Module) -> Iterator[None]:
    """Accumulate gradients locally (micro-steps before the last): no reduce-scatter."""
    model.set_requires_gradient_sync(False)
    try:
        yield
    finally:
        model.set_requires_gradient_sync(True)
