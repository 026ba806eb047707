"""
Weight-only int8 for decoding (sample.py, chat.py, serve.py --quantize=int8): every matrix of the blocks and the head
stored as int8 with one scale per output row, multiplied by torch's int8 weight-only kernel with bfloat16 activations.
Batch-1 decoding reads every weight once per token, so a quarter of float32's bytes is up to ~2x the tokens/s on a
CPU (BENCHMARKS.md); the greedy tokens may differ from the float model's where two candidates are close.

    python sample.py --out_dir=out-char-tiny --quantize=int8
"""

import torch
import torch.nn as nn

from configurator import die

KINDS = ("", "int8")


class Int8Linear(nn.Module):
    """nn.Linear's product from int8 weights: y = (x in bfloat16) @ (w_int8 * scale).T + bias, in x's dtype."""

    def __init__(self, linear):
        super().__init__()
        w = linear.weight.detach().float()
        scale = w.abs().amax(dim=1).clamp(min=1e-12) / 127  # (out,) one per output row: the row's largest is 127
        self.register_buffer("weight", (w / scale[:, None]).round().clamp(-127, 127).to(torch.int8))
        self.register_buffer("scale", scale.to(torch.bfloat16))
        self.bias = linear.bias

    def forward(self, x):
        y = torch.ops.aten._weight_int8pack_mm(x.reshape(-1, x.size(-1)).to(torch.bfloat16), self.weight, self.scale)
        y = y.to(x.dtype).view(*x.shape[:-1], -1)
        return y if self.bias is None else y + self.bias


def check_kind(kind):
    """The scripts' check of --quantize, with their other settings' (before a model loads)."""
    if kind not in KINDS:
        die(f"--quantize={kind!r} is not one of int8 (or '' for none)")


def quantized(model, kind):
    """The model with its nn.Linear layers as Int8Linear (kind "int8"), or as it is (kind ""); in eval mode only."""
    if not kind:
        return model
    device = next(model.parameters()).device
    try:  # the kernel exists for this device (CPU and MPS; not every CUDA build)
        torch.ops.aten._weight_int8pack_mm(torch.ones(1, 32, dtype=torch.bfloat16, device=device),
                                           torch.ones(8, 32, dtype=torch.int8, device=device),
                                           torch.ones(8, dtype=torch.bfloat16, device=device))
    except (RuntimeError, NotImplementedError) as e:
        die(f"--quantize=int8 needs torch's int8 weight-only kernel, which this torch lacks on {device} "
            f"({str(e).splitlines()[0][:100]}); drop --quantize")
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.Linear):
                setattr(parent, name, Int8Linear(child))
    return model.eval()
