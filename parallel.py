"""
Training past one device's memory, and across processes: FSDP2 (torch.distributed.fsdp.fully_shard, as torchtitan
applies it) for train.py's parallel=fsdp, gradient sync per micro-step for DDP and FSDP alike, and what a process
holds. Not run by itself. FSDP and DTensor are imported where they are used, so that importing this module (to
read a checkpoint, say) does not load them.
"""

try:
    import resource  # POSIX: peak resident memory
except ImportError:
    resource = None

import os

import torch
import torch.distributed as dist

from errors import die
from hardware import DTYPES

TORCHRUN_VARS = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def torchrun_env():
    """(ddp, rank, local_rank, world_size) from the variables torchrun sets (RANK marks a process it launched);
    one line when some are missing or not numbers (a stray RANK in the shell, say)."""
    if "RANK" not in os.environ:
        return False, 0, 0, 1
    missing = [name for name in TORCHRUN_VARS if name not in os.environ]
    numbers = [os.environ.get(name, "") for name in TORCHRUN_VARS[:3]]
    if missing or not all(v.isdigit() for v in numbers):
        what = f"{', '.join(missing)} not set" if missing else "RANK, LOCAL_RANK or WORLD_SIZE not a whole number"
        die(f"RANK={os.environ['RANK']} is in the environment but {what}: torchrun sets them all; launch with "
            f"torchrun, or unset RANK", every_rank=True)
    return True, *(int(v) for v in numbers)


def shard(model, dtype, device, inference=False):
    """fully_shard each block, then the root (the tied embedding and lm_head, the norms and positions as one unit),
    over all processes. A model built on the meta device (no memory) gets memory for this process's shards only and
    the weights one process would draw (init_weights draws each whole in CPU memory, one at a time, and keeps this
    process's rows), so no process ever holds the whole model. A model in CPU memory (a warm start from gpt2-xl or
    hf:, loaded on each process's CPU) moves to `device` one block at a time as it is sharded. In a mixed precision
    dtype the parameters are cast for compute and gradients reduced in float32 (MixedPrecisionPolicy, instead of
    autocast). The root keeps its parameters gathered after a forward (backward needs them at once) unless the model
    is only evaluated (inference: train.py's EMA copy)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    from torch.distributed.tensor import distribute_tensor
    mesh = init_device_mesh(torch.device(device).type, (dist.get_world_size(),))
    policy = MixedPrecisionPolicy(param_dtype=DTYPES[dtype] if dtype != "float32" else None,
                                  reduce_dtype=torch.float32)
    for block in model.transformer.h:
        fully_shard(block, mesh=mesh, mp_policy=policy)
    fully_shard(model, mesh=mesh, mp_policy=policy, reshard_after_forward=True if inference else None)
    if model.lm_head.weight.is_meta:
        model.to_empty(device=device)
        model.init_weights(assign=lambda p, whole: p.copy_(distribute_tensor(
            whole.to(p.device), p.device_mesh, p.placements, src_data_rank=None)))
    return model


def full(tensor):
    """A sharded (DTensor) value gathered whole; a plain tensor as it is."""
    return tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor


def sync_gradients(model, sync):
    """Reduce gradients on this micro-step or not (the last of an accumulation does): FSDP2's call, or DDP's flag."""
    if hasattr(model, "set_requires_gradient_sync"):
        model.set_requires_gradient_sync(sync)
    else:
        model.require_backward_grad_sync = sync


def memory_held(model, optimizers):
    """What this process holds, in a few words: the bytes of parameters and optimizer state (its shards, under FSDP)
    and its peak resident memory."""
    local = lambda t: t.to_local() if hasattr(t, "to_local") else t
    tensors = [local(p) for p in model.parameters()]
    tensors += [local(v) for opt in optimizers for s in opt.state.values() for v in s.values() if torch.is_tensor(v)]
    held = sum(t.numel() * t.element_size() for t in tensors) / 2**20
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 if resource else float("nan")  # KiB on Linux
    return f"{held:.2f} MiB of parameters and optimizer state per process (peak RSS {peak:,.0f} MiB)"


def is_sharded(module):
    """Whether FSDP has sharded the module's parameters (DTensors)."""
    return hasattr(next(module.parameters()), "full_tensor")
