"""
train.py's optimizers and their schedule: AdamW groups (weight decay on matrices only), torch.optim.Muon for the
matrices inside the blocks, ShardedMuon for matrices sharded by FSDP, and the LR multiplier (warmup, then cosine or
warmup-stable-decay, over iterations or seconds). Not run by itself.
"""

import math

import torch

from parallel import is_sharded


class ShardedMuon(torch.optim.Muon):
    """torch.optim.Muon for matrices sharded over processes (DTensors, train.py's parallel=fsdp): the momentum is
    kept on each process's shard. The matrices go in rounds of one per process (nanochat's way): every update of a
    round is gathered whole (full_tensor), each process orthogonalizes the one it owns with torch's own Newton-Schulz
    exactly as one process would, at the same time as the others, and sends every process its shard of the result.
    So sharded training takes one process's steps, each process orthogonalizing 1/world of the matrices."""

    @torch.no_grad()
    def step(self, closure=None):
        from torch.distributed.tensor import distribute_tensor
        from torch.optim._muon import _adjust_lr, _zeropower_via_newtonschulz  # torch.optim.Muon's own math

        todo = [(g, p) for g in self.param_groups for p in g["params"] if p.grad is not None]
        world = todo[0][1].device_mesh.size() if todo else 1
        for first in range(0, len(todo), world):
            rnd, updates = todo[first:first + world], []
            for g, p in rnd:
                buf = self.state[p].setdefault("momentum_buffer", torch.zeros_like(p.grad))
                buf.lerp_(p.grad, 1 - g["momentum"])
                updates.append(p.grad.lerp(buf, g["momentum"]) if g["nesterov"] else buf)
            wholes = [u.full_tensor() for u in updates]  # (every process joins every gather)
            me = updates[0].device_mesh.get_local_rank()
            if me < len(rnd):  # this process's matrix (in bfloat16, as torch's; made float32 exactly for the scatter)
                g = rnd[me][0]
                mine = _zeropower_via_newtonschulz(wholes[me], g["ns_coefficients"], g["ns_steps"], g["eps"])
                wholes[me] = mine.to(wholes[me].dtype)
            for owner, ((g, p), u, whole) in enumerate(zip(rnd, updates, wholes, strict=True)):
                ortho = distribute_tensor(whole, u.device_mesh, u.placements, src_data_rank=owner)  # the owner's rows
                p.mul_(1 - g["lr"] * g["weight_decay"])
                p.add_(ortho, alpha=-_adjust_lr(g["lr"], g["adjust_lr_fn"], p.shape))


def make_optimizers(model, cfg, fused=False):
    """train.py's optimizers from its settings (cfg): AdamW for every parameter, or with optimizer="muon"
    torch.optim.Muon for the 2-D matrices inside the blocks and AdamW for the rest (embeddings, head, norms, biases);
    ShardedMuon when the model is sharded (FSDP2). Weight decay on AdamW's matrices only; each group keeps its peak LR
    in base_lr for the schedule to scale. Returns (optimizers, Muon's parameter names, AdamW's)."""
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    muon = [n for n, p in params.items()
            if cfg["optimizer"] == "muon" and n.startswith("transformer.h.") and p.dim() == 2]
    adam = [n for n in params if n not in muon]
    lr = cfg["learning_rate"]
    groups = [dict(params=[params[n] for n in adam if params[n].dim() >= 2], weight_decay=cfg["weight_decay"],
                   base_lr=lr),
              dict(params=[params[n] for n in adam if params[n].dim() < 2], weight_decay=0.0, base_lr=lr)]
    optimizers = [torch.optim.AdamW(groups, lr=lr, betas=(cfg["beta1"], cfg["beta2"]), eps=cfg["eps"], fused=fused)]
    if muon:
        optimizers.append((ShardedMuon if is_sharded(model) else torch.optim.Muon)(
            [dict(params=[params[n] for n in muon], base_lr=cfg["muon_lr"])], lr=cfg["muon_lr"],
            weight_decay=cfg["muon_weight_decay"], momentum=cfg["muon_momentum"], ns_steps=cfg["muon_ns_steps"]))
    return optimizers, muon, adam


def lr_factor(it, elapsed, cfg):
    """train.py's LR multiplier at step `it` after `elapsed` seconds of training, from its settings (cfg): linear
    warmup over warmup_iters, then lr_schedule (cosine to min_lr, or wsd: stable, then a linear warmdown) over the
    rest of the run, measured in iterations (to lr_decay_iters, or max_iters) or, with max_time, in seconds."""
    if it < cfg["warmup_iters"]:
        return (it + 1) / (cfg["warmup_iters"] + 1)
    if not cfg["decay_lr"]:
        return 1.0
    decay_iters = cfg["lr_decay_iters"] or cfg["max_iters"]
    progress = (elapsed / cfg["max_time"] if cfg["max_time"] else
                (it - cfg["warmup_iters"]) / max(1, decay_iters - cfg["warmup_iters"]))
    progress = min(progress, 1.0)
    floor = cfg["min_lr"] / cfg["learning_rate"] if cfg["learning_rate"] else 0.0
    if cfg["lr_schedule"] == "cosine":
        return floor + (1 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))
    return floor + (1 - floor) * min(1.0, (1.0 - progress) / cfg["warmdown_frac"])  # wsd
