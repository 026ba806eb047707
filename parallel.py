"""
Past one device's memory: FSDP2 (torch.distributed.fsdp.fully_shard, as torchtitan applies it) for train.py's
parallel=fsdp, and sharded checkpoints with torch.distributed.checkpoint (DCP) that resume at any world size.
Not run by itself. FSDP, DTensor and DCP are imported where they are used: they take ~0.5 s to import, which every
script that reads a checkpoint (through checkpoint.py) would pay on every start.
"""

import os
import shutil
import warnings

try:
    import resource  # POSIX: peak resident memory
except ImportError:
    resource = None

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh

from common import DTYPES, is_sharded, save_checkpoint
from configurator import die

TRAIN_STATE = "train.pt"  # beside the shards in a sharded (DCP) checkpoint folder: config, counters, RNG, tokenizer


def shard(model, dtype, device, inference=False):
    """fully_shard each block, then the root (the tied embedding and lm_head, the norms and positions as one unit),
    over all processes. A model built on the meta device (no memory) gets memory for this process's shards only and
    the weights one process would draw (init_weights draws each whole in CPU memory, one at a time, and keeps this
    process's rows), so no process ever holds the whole model. A model in CPU memory (a warm start from gpt2-xl or
    hf:, loaded on each process's CPU) moves to `device` one block at a time as it is sharded. In a mixed precision
    dtype the parameters are cast for compute and gradients reduced in float32 (MixedPrecisionPolicy, instead of
    autocast). The root keeps its parameters gathered after a forward (backward needs them at once) unless the model
    is only evaluated (inference: train.py's EMA copy)."""
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
    local = lambda t: t.to_local() if hasattr(t, "to_local") else t  # noqa: E731
    tensors = [local(p) for p in model.parameters()]
    tensors += [local(v) for opt in optimizers for s in opt.state.values() for v in s.values() if torch.is_tensor(v)]
    held = sum(t.numel() * t.element_size() for t in tensors) / 2**20
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 if resource else float("nan")  # KiB on Linux
    return f"{held:.2f} MiB of parameters and optimizer state per process (peak RSS {peak:,.0f} MiB)"


def save_sharded(folder, model, optimizers, ema, train_state, master):
    """A DCP checkpoint folder, written whole or not at all: every process writes its shards of the weights, the
    optimizer states and the EMA weights (ema: an AveragedModel or None), and rank 0 the training state, into
    folder.tmp, then rank 0 swaps it in; a crash at any moment leaves the previous one readable (folder, or
    folder.old while the swap is under way)."""
    tmp, old = folder + ".tmp", folder + ".old"
    if master and os.path.isdir(tmp):
        shutil.rmtree(tmp)
    barrier()
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_state_dict
    model_state, optim_state = get_state_dict(model, optimizers)
    state = dict(model=model_state, optimizers=optim_state) | (dict(ema=get_model_state_dict(ema)) if ema else {})
    try:
        with warnings.catch_warnings():  # (one process without a process group: saved as such, and said so)
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
            dcp.save(state, checkpoint_id=tmp, no_dist=not dist.is_initialized())
    except Exception as e:  # a full disk, a read-only folder
        die(f"could not write {tmp} ({type(e).__name__}: {str(e)[:160]}); free some space or make the folder "
            f"writable" + (": the previous checkpoint is kept" if os.path.isdir(folder) else ""))
    if master:
        save_checkpoint(train_state, os.path.join(tmp, TRAIN_STATE))
        if os.path.isdir(folder):
            os.replace(folder, old)
        os.replace(tmp, folder)
        shutil.rmtree(old, ignore_errors=True)
        if os.path.isfile(folder + ".pt"):  # the whole checkpoint of a ddp run this one resumed: superseded now
            os.remove(folder + ".pt")
    barrier()


def load_sharded(folder, model, optimizers, ema=None):
    """Load a DCP checkpoint's weights and optimizer state (and EMA weights, given an AveragedModel) into this run's
    model and optimizers, however it is sharded now (any number of processes, or one without a process group)."""
    from torch.distributed.checkpoint.state_dict import (
        get_model_state_dict,
        get_state_dict,
        set_model_state_dict,
        set_state_dict,
    )
    model_state, optim_state = get_state_dict(model, optimizers)
    state = dict(model=model_state, optimizers=optim_state) | (dict(ema=get_model_state_dict(ema)) if ema else {})
    try:
        dcp_load(state, folder)
    except Exception as e:
        die(f"{folder} does not match this run ({type(e).__name__}: {str(e).splitlines()[0][:160]}); resume with "
            f"the architecture and optimizer it was trained with")
    set_state_dict(model, optimizers, model_state_dict=state["model"], optim_state_dict=state["optimizers"])
    if ema:
        set_model_state_dict(ema, state["ema"])


def load_whole(module, state):
    """A whole state dict (a ckpt.pt's) into a module, sharded or not."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
    set_model_state_dict(module, state, options=StateDictOptions(full_state_dict=is_sharded(module)))


def load_whole_optimizers(model, optimizers, states):
    """Optimizer states saved whole (a ddp or one-process run's ckpt.pt: parameters by their index in each group)
    into this run's optimizers over sharded parameters: named by the parameters they belong to, then each process
    keeps its shards (set_optimizer_state_dict with full_state_dict)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict
    names = {p: n for n, p in model.named_parameters()}
    for opt, saved in zip(optimizers, states, strict=True):
        fqn = {}
        for saved_group, group in zip(saved["param_groups"], opt.param_groups, strict=True):
            fqn.update(zip(saved_group["params"], [names[p] for p in group["params"]], strict=True))
        whole = dict(state={fqn[i]: s for i, s in saved["state"].items()},
                     param_groups=[dict(g, params=[fqn[i] for i in g["params"]]) for g in saved["param_groups"]])
        set_optimizer_state_dict(model, opt, whole, options=StateDictOptions(full_state_dict=True))


def dcp_load(state, folder):
    """dcp.load, in one process without a process group as well (without the warning that this is what it does)."""
    import torch.distributed.checkpoint as dcp
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.load(state, checkpoint_id=folder, no_dist=not dist.is_initialized())


def barrier():
    if dist.is_initialized():
        dist.barrier()
