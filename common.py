"""
What the scripts share at run time: picking the device and precision, reading and writing checkpoints, and the
pieces of a training step that tests call on their own (optimizers, batch arithmetic, get_batch, evaluate, RNG
states). Not run by itself.
"""

import math
import os
import random
from contextlib import nullcontext

import numpy as np
import torch
import torch.distributed as dist

from configurator import ABOVE_ZERO, FRACTION, NON_NEGATIVE, POSITIVE, SEED, UNIT, die
from dataset import atomic_write

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# dtype=auto on a CPU with bfloat16 units trains in bfloat16 from this width and tokens per micro-step up: measured on
# a 2-core Sapphire Rapids VM, bf16/fp32 step time was 0.47 at 6x384 (4,096 tokens), 0.66 at 2x256, 0.82 at 4x192,
# 0.87-1.28 at 128 wide and 0.95 at 96 (BENCHMARKS.md)
BF16_CPU_WIDTH, BF16_CPU_TOKENS = 192, 2048
# dense bf16 peak FLOP/s per GPU, matched against torch.cuda.get_device_name() for MFU
PEAK_FLOPS = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "L4": 121e12, "A10": 125e12,
              "4090": 165e12, "3090": 71e12, "V100": 125e12, "T4": 65e12}
SAMPLING_RULES = dict(max_new_tokens=POSITIVE, temperature=NON_NEGATIVE, top_k=NON_NEGATIVE, top_p=UNIT, min_p=FRACTION,
                      repetition_penalty=ABOVE_ZERO, no_repeat_ngram_size=NON_NEGATIVE, seed=SEED)  # sample.py, chat.py


def pick_device(device):
    """'' or 'auto' picks cuda > mps > cpu; anything else must be a device torch can use here."""
    if device in ("", "auto"):
        if torch.cuda.is_available():
            return "cuda"
        return "mps" if torch.backends.mps.is_available() else "cpu"
    kind = device.split(":")[0]
    available = {"cpu": True, "cuda": torch.cuda.is_available(), "mps": torch.backends.mps.is_available()}
    if kind not in available:
        die(f"--device={device!r} is not one of cpu, cuda, cuda:N, mps (or leave it empty to autodetect)")
    if not available[kind]:
        die(f"--device={device} is not available on this machine; try --device=cpu")
    return device


def gpu_peak(device):
    """The GPU's name and its dense bf16 peak FLOP/s from PEAK_FLOPS, for MFU ('' and 0 off CUDA; 0 if not listed)."""
    name = torch.cuda.get_device_name(device) if device.startswith("cuda") else ""
    return name, next((f for key, f in PEAK_FLOPS.items() if key in name), 0.0)


def pick_dtype(dtype, device, width=0, tokens=0):
    """'auto' is bfloat16 on GPUs that have it, float16 on older GPUs; on a CPU with bfloat16 matrix units, bfloat16
    autocast for training a model at least BF16_CPU_WIDTH wide on at least BF16_CPU_TOKENS tokens per micro-step
    (width and tokens given: train.py), where it measured faster (BENCHMARKS.md); float32 elsewhere."""
    if dtype == "auto":
        if device.startswith("cuda"):
            return "bfloat16" if torch.cuda.is_bf16_supported() else "float16"
        fast = device == "cpu" and cpu_bf16() and width >= BF16_CPU_WIDTH and tokens >= BF16_CPU_TOKENS
        return "bfloat16" if fast else "float32"
    if dtype not in DTYPES:
        die(f"--dtype={dtype!r} is not one of auto, {', '.join(DTYPES)}")
    return dtype


def cpu_bf16():
    """Whether this CPU has bfloat16 matrix units (AMX or AVX-512 BF16, from /proc/cpuinfo's flags; Linux only)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            flags = next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), [])
    except OSError:
        return False
    return "amx_bf16" in flags or "avx512_bf16" in flags


def autocast(device, dtype):
    """The mixed-precision context for the forward pass: a no-op for float32."""
    if dtype == "float32":
        return nullcontext()
    return torch.autocast(device_type=device.split(":")[0], dtype=DTYPES[dtype])


def save_checkpoint(obj, path):
    """torch.save, atomically (dataset.atomic_write): the checkpoint already at path stays until the new one is
    whole, and a failed save says so."""
    kept = "the previous checkpoint is kept, resume from it" if os.path.isfile(path) else "nothing was saved"
    atomic_write(path, lambda f: torch.save(obj, f), binary=True, keep_note=kept)


def load_checkpoint(path):
    """Read a checkpoint with weights_only=True (tensors, numbers, strings, lists, dicts only)."""
    if not os.path.isfile(path):
        die(f"checkpoint {path} not found; train one first (python train.py ...) or check --out_dir")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated, corrupt, or objects beyond plain data: never unpickled
        die(f"{path} is not a readable checkpoint ({type(e).__name__}): it is truncated, corrupt, or holds more than "
            f"tensors and plain data, which are never unpickled; use another checkpoint")


def is_sharded(module):
    """Whether FSDP has sharded the module's parameters (DTensors)."""
    return hasattr(next(module.parameters()), "full_tensor")


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


def split_batch(tokens, batch_size, block_size, world_size):
    """(micro-batch, micro-steps per process) for `tokens` per optimizer step shared by world_size processes: the
    largest micro-batch up to batch_size that divides each process's share of sequences."""
    seqs, rest = divmod(tokens, block_size * world_size)  # sequences per process per step
    if rest or not seqs:
        raise ValueError(f"{tokens:,} tokens per step do not split into whole sequences of block_size={block_size} "
                         f"over "
                         f"{world_size} process(es); make total_batch_size (or batch_size*block_size*"
                         f"gradient_accumulation_steps) a multiple of {block_size * world_size:,}")
    micro = max(b for b in range(1, min(batch_size, seqs) + 1) if seqs % b == 0)
    return micro, seqs // micro


def draw_windows(data, block_size, batch_size, gen, mask=None, starts=None):
    """Inputs and targets x, y (batch_size, block_size) int64 from windows of `data` at random offsets, or, for
    conversations, at random conversation `starts`; targets the `mask` leaves out (0: system and user turns) are
    -1, which the loss ignores, as is the padding past the end of the data."""
    if starts is None:
        ix = torch.randint(len(data) - block_size, (batch_size,), generator=gen).tolist()
    else:
        ix = starts[torch.randint(len(starts), (batch_size,), generator=gen).numpy()].tolist()

    def window(array, i):  # block_size + 1 values from i, zeros past the end
        part = np.asarray(array[i:i + block_size + 1], dtype=np.int64)
        return torch.from_numpy(np.pad(part, (0, block_size + 1 - len(part))))
    xy = torch.stack([window(data, i) for i in ix])
    x, y = xy[:, :-1], xy[:, 1:].clone()
    if mask is not None:
        y[torch.stack([window(mask, i) for i in ix])[:, 1:] == 0] = -1
    return x, y


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


def get_batch(data, step, k, batch_size, block_size, seed, device):
    """The k-th micro-batch (x, y) of optimizer step `step` from a split (dataset.open_split): each (step, k) seeds
    its own generator, so every rank draws distinct, reproducible batches and a resumed run continues the same
    stream. Conversations: windows start where a conversation does, and targets outside the assistant's turns
    are -1, which the loss ignores."""
    tokens = np.memmap(data["path"], dtype=data["dtype"], mode="r")  # opened per batch, as nanoGPT does (memory)
    gen = torch.Generator().manual_seed(hash((seed, data["split"] == "val", step, k)) % 2**62)  # same in every process
    x, y = draw_windows(tokens, block_size, batch_size, gen, data["mask"], data["starts"])
    if max(y.max(), x[:, 0].max()) >= data["vocab_size"]:
        die(f"{data['path']} holds token id {max(x.max(), y.max())}, beyond its meta.json's vocab_size="
            f"{data['vocab_size']}; prepare the dataset again")
    if device.startswith("cuda"):  # pinned memory lets the copy overlap with compute
        return x.pin_memory().to(device, non_blocking=True), y.pin_memory().to(device, non_blocking=True)
    return x.to(device), y.to(device)


def out_of_memory(batch_size, block_size):
    die(f"out of memory at batch_size={batch_size} x block_size={block_size}; lower --batch_size (raising "
        f"--gradient_accumulation_steps keeps the tokens per step) or pass --auto_microbatch=True")


@torch.no_grad()
def evaluate(model, batches, splits, eval_iters, ctx, token_bytes, rank=0, world_size=1, stopped=lambda: False):
    """Mean loss on the same eval_iters batches of each split at every evaluation (batches(split, step, k) draws
    them; the processes share them out), and bits per byte: the total nats over the UTF-8 bytes of the targets
    (token_bytes: bytes per token id), / ln 2, comparable across tokenizers. None when stopped() turns true
    during it (a signal): the run stops without waiting for the rest."""
    model.eval()
    out = {}
    for split in splits:
        sums = torch.zeros(3, dtype=torch.float64, device=token_bytes.device)  # nats, tokens, bytes
        for i in range(rank, eval_iters + (-eval_iters) % world_size, world_size):  # as many forwards on every rank
            if stopped():
                return None
            x, y = batches(split, -1 - i % eval_iters, 0)  # negative steps: batches that no training step draws
            try:
                with ctx:
                    logits, _ = model(x, y)
            except torch.OutOfMemoryError:
                out_of_memory(*x.shape)
            y = y.view(-1) if i < eval_iters else torch.full_like(y.view(-1), -1)  # (FSDP's extra forwards count 0)
            nats = torch.nn.functional.cross_entropy(logits.view(-1, logits.size(-1)), y, ignore_index=-1,
                                                     reduction="none")
            counted = y >= 0
            nbytes = token_bytes[y.clamp(min=0)][counted].sum()
            sums += torch.stack([nats.double().sum(), counted.double().sum(), nbytes])
        if world_size > 1:
            dist.all_reduce(sums)
        nats, tokens, nbytes = sums.tolist()
        out[split], out[f"{split}_bpb"] = nats / tokens, nats / max(nbytes, 1.0) / math.log(2)
    model.train()
    return out


def mean_over_ranks(value, device):
    """The mean of a float over all processes (the value itself without torch.distributed)."""
    if not dist.is_initialized():
        return value
    t = torch.tensor(value, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.item() / dist.get_world_size()


def rng_states(ddp, world_size, device_type):
    """Every process's RNG states (python, numpy, torch, cuda), gathered for the checkpoint."""
    torch_states = [torch.get_rng_state()]
    cuda_states = [torch.cuda.get_rng_state()] if device_type == "cuda" else None
    if ddp:  # each rank has its own dropout stream
        torch_states = [None] * world_size
        dist.all_gather_object(torch_states, torch.get_rng_state())
        if cuda_states is not None:
            cuda_states = [None] * world_size
            dist.all_gather_object(cuda_states, torch.cuda.get_rng_state())
    py, npy = random.getstate(), np.random.get_state()
    return dict(python=[py[0], list(py[1]), py[2]], numpy=[npy[0], npy[1].tolist(), *npy[2:]],
                torch=torch_states, cuda=cuda_states)


def restore_rng(rng, rank, device_type):
    """Put back this rank's RNG states from rng_states()."""
    random.setstate((rng["python"][0], tuple(rng["python"][1]), rng["python"][2]))
    np.random.set_state(tuple(np.array(v, dtype=np.uint32) if i == 1 else v for i, v in enumerate(rng["numpy"])))
    torch.set_rng_state(rng["torch"][rank % len(rng["torch"])])
    if device_type == "cuda" and rng["cuda"] is not None:
        torch.cuda.set_rng_state(rng["cuda"][rank % len(rng["cuda"])])


