"""
train.py's step, in pieces a benchmark can run too: the batch arithmetic, the batches drawn from a dataset's bins, the
step itself (micro-steps accumulated, clipped, one update of every optimizer), and the evaluation. Not run by itself.
"""

import math

import numpy as np
import torch
import torch.distributed as dist

from errors import die
from parallel import sync_gradients


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
def evaluate(model, batches, batch_size, splits, eval_iters, ctx, token_bytes, rank=0, world_size=1,
             stopped=lambda: False):
    """Mean loss on the same eval_iters batches of each split at every evaluation (batches(split, step, k,
    batch_size) draws them; the processes share them out), and bits per byte: the total nats over the UTF-8 bytes
    of the targets (token_bytes: bytes per token id), / ln 2, comparable across tokenizers. None when stopped()
    turns true during it (a signal): the run stops without waiting for the rest."""
    model.eval()
    out = {}
    for split in splits:
        sums = torch.zeros(3, dtype=torch.float64, device=token_bytes.device)  # nats, tokens, bytes
        for i in range(rank, eval_iters + (-eval_iters) % world_size, world_size):  # as many forwards on every rank
            if stopped():
                return None
            x, y = batches(split, -1 - i % eval_iters, 0, batch_size)  # negative steps: no training step's
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


class Trainer:
    """One optimizer step of train.py, built once by its setup. The step's tokens are cut into accum_steps micro-batches
    of batch_size sequences per process; with auto_microbatch an out-of-memory error halves batch_size and doubles
    accum_steps (the same tokens in half the memory), and these two attributes are the one place that change lives:
    the evaluation draws its batches at trainer.batch_size too. draw(split, step, k, batch_size) gives (x, y)."""

    def __init__(self, model, raw_model, optimizers, scaler, ctx, draw, batch_size, accum_steps, rank=0,
                 label_smoothing=0.0, grad_clip=0.0, auto_microbatch=False, log=print, ema=None):
        self.model, self.raw_model, self.optimizers, self.scaler, self.ctx = model, raw_model, optimizers, scaler, ctx
        self.draw, self.batch_size, self.accum_steps, self.rank = draw, batch_size, accum_steps, rank
        self.label_smoothing, self.grad_clip, self.auto_microbatch, self.log = (label_smoothing, grad_clip,
                                                                               auto_microbatch, log)
        self.ema = ema  # an AveragedModel of raw_model's weights (train.py --ema_decay), or None

    def accumulate(self, it):
        """Gradients of step `it` over accum_steps micro-batches (reduced across processes on the last one only);
        returns the mean loss over the micro-steps."""
        loss_sum, n = 0.0, self.accum_steps
        for k in range(n):
            x, y = self.draw("train", it, self.rank * n + k, self.batch_size)
            self.shape = x.shape  # (B, T), for the out-of-memory line
            sync_gradients(self.model, k == n - 1)  # reduce once per step, not per micro-step
            with self.ctx:
                _, loss = self.model(x, y, label_smoothing=self.label_smoothing, return_logits=False)  # no logits
            self.scaler.scale(loss / n).backward()
            loss_sum = loss_sum + loss.detach()
        return loss_sum / n

    def gradients(self, it):
        """accumulate(it), halving the micro-batch on out-of-memory errors when auto_microbatch is on."""
        while True:
            try:
                return self.accumulate(it)
            except torch.OutOfMemoryError:
                if not self.auto_microbatch or self.batch_size == 1:
                    out_of_memory(*self.shape)
                self.zero_grads()
                self.batch_size, self.accum_steps = self.batch_size // 2, self.accum_steps * 2
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()
                self.log(f"out of memory: auto_microbatch retries with batch_size={self.batch_size} x "
                         f"{self.accum_steps} micro-steps")

    def zero_grads(self):
        for opt in self.optimizers:
            opt.zero_grad(set_to_none=True)

    def step(self, it, lr_mult):
        """One optimizer step at `lr_mult` times each group's peak LR: gradients, unscaled (float16), clipped to
        grad_clip (0: off), every optimizer stepped, the moving average of the weights updated. Returns (mean loss,
        gradient norm before clipping)."""
        for opt in self.optimizers:
            for group in opt.param_groups:
                group["lr"] = group["base_lr"] * lr_mult
        loss = self.gradients(it)
        for opt in self.optimizers:
            self.scaler.unscale_(opt)
        norm = torch.nn.utils.clip_grad_norm_(self.raw_model.parameters(), self.grad_clip or float("inf"))
        for opt in self.optimizers:
            self.scaler.step(opt)
        self.scaler.update()
        self.zero_grads()
        if self.ema is not None:
            self.ema.update_parameters(self.raw_model)
        return loss, norm


class Batches:
    """The train and val splits' micro-batches: batches(split, step, k, batch_size) is get_batch's (x, y)."""

    def __init__(self, splits, block_size, seed, device):
        self.splits, self.block_size, self.seed, self.device = splits, block_size, seed, device

    def __call__(self, split, step, k, batch_size):
        return get_batch(self.splits[split], step, k, batch_size, self.block_size, self.seed, self.device)
