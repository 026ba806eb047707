"""
The weights as decoding reads them (every script that loads a model through inference.load_for_inference). Batch-1
decoding reads every weight once per token, so its speed is how fast the matrices stream from memory. Two ways to
stream them faster on a CPU (BENCHMARKS.md has the measurements):
- the float32 matrices wider out than in (the head, a third of GPT-2 small's bytes; attention's qkv; the MLP's
  first) stored transposed, (in, out) in memory: the layout the CPU's matrix product reads them fastest in at a few
  rows, while the others read faster as they are; the same values, so the same tokens. Always on a CPU.
- --quantize=int8: every matrix of the blocks and the head stored as int8 with one scale per output row, multiplied by
  torch's int8 weight-only kernel with bfloat16 activations: a quarter of float32's bytes, so faster tokens on a CPU;
  the greedy tokens may differ from the float model's where two candidates are close.
- --quantize=int4: 4 bits a weight in groups of 32 inputs with a scale and a zero each (torch's CPU int4 kernel),
  an eighth of float32's bytes; a larger error than int8's (BENCHMARKS.md has the loss and greedy agreement).

    python sample.py --out_dir=out-char-tiny --quantize=int8
"""

import torch
import torch.nn as nn

from errors import die

KINDS = ("", "int8", "int4")
GROUP = 32  # int4: input features per scale and zero (llama.cpp's Q4_0 blocks hold 32 too)


class Int8Linear(nn.Module):
    """nn.Linear's product from int8 weights: y = (x in bfloat16) @ (w_int8 * scale).T + bias, in x's dtype."""

    def __init__(self, linear):
        super().__init__()
        w = linear.weight.detach().float().contiguous()  # (out, in) in memory, as the kernel reads it
        scale = w.abs().amax(dim=1).clamp(min=1e-12) / 127  # (out,) one per output row: the row's largest is 127
        self.register_buffer("weight", (w / scale[:, None]).round().clamp(-127, 127).to(torch.int8))
        self.register_buffer("scale", scale.to(torch.bfloat16))
        self.bias, self.out_features, self.in_features = linear.bias, linear.out_features, linear.in_features

    def forward(self, x):
        y = torch.ops.aten._weight_int8pack_mm(x.reshape(-1, x.size(-1)).to(torch.bfloat16), self.weight, self.scale)
        y = y.to(x.dtype).view(*x.shape[:-1], -1)
        return y if self.bias is None else y + self.bias


class Int4Linear(nn.Module):
    """nn.Linear's product from 4-bit weights, each GROUP input features of a row with a scale and a zero:
    w = (q - 8) * scale + zero with q in 0..15 (the row's group min to max in 15 steps), multiplied by torch's CPU
    int4 kernel with bfloat16 activations; in x's dtype."""

    def __init__(self, linear):
        super().__init__()
        w = linear.weight.detach().float().contiguous()  # (out, in)
        groups = w.view(w.size(0), -1, GROUP)  # (out, in / GROUP, GROUP)
        low, high = groups.amin(-1, keepdim=True), groups.amax(-1, keepdim=True)
        scale = ((high - low) / 15).clamp(min=1e-8)
        q = ((groups - low) / scale).round().clamp(0, 15).to(torch.int32).view_as(w)
        self.register_buffer("weight", torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1))
        zero = low + 8 * scale  # the kernel's (q - 8) * scale + zero is then low + q * scale
        self.register_buffer("scales", torch.cat([scale, zero], -1).transpose(0, 1).contiguous().to(torch.bfloat16))
        self.bias, self.out_features, self.in_features = linear.bias, w.size(0), w.size(1)  # scales: (in/GROUP, out, 2)

    def forward(self, x):
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(x.reshape(-1, x.size(-1)).to(torch.bfloat16), self.weight,
                                                       GROUP, self.scales)
        y = y.to(x.dtype).view(*x.shape[:-1], self.out_features)
        return y if self.bias is None else y + self.bias


def transposed(model):
    """The float32 matrices with more outputs than inputs stored (in, out) in memory, seen as the same (out, in)
    tensor: F.linear then multiplies by a contiguous (in, out) matrix, which MKL streams faster than the (out, in)
    one at a few rows where out > in. Values, names, shapes and ties stay (each Parameter gets new data in place)."""
    linears = [m for m in model.modules() if isinstance(m, nn.Linear) and m.out_features > m.in_features]
    for w in {id(m.weight): m.weight for m in linears}.values():
        if w.dtype == torch.float32 and w.is_contiguous():
            w.data = w.data.t().contiguous().t()
    return model


def for_decoding(model, kind):
    """The model in eval mode, ready to decode: its nn.Linear layers as Int8Linear (kind "int8") or Int4Linear
    ("int4"), else on a CPU its float32 matrices wider out than in transposed in memory."""
    model.eval()
    device = next(model.parameters()).device
    if not kind:
        return transposed(model) if device.type == "cpu" else model
    kind_class = Int8Linear if kind == "int8" else Int4Linear
    try:  # the kernel exists for this device (int8: CPU and MPS, not every CUDA build; int4 here: CPU)
        kind_class(nn.Linear(GROUP, 16, bias=False, device=device))(torch.ones(1, GROUP, device=device))
    except (RuntimeError, NotImplementedError) as e:
        die(f"--quantize={kind} needs torch's {kind} weight-only kernel, which this torch lacks on {device} "
            f"({str(e).splitlines()[0][:100]}); drop --quantize")
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.Linear):
                if kind == "int4" and (child.in_features % GROUP or child.out_features % 16):
                    die(f"--quantize=int4 needs every matrix's inputs in groups of {GROUP} and outputs in 16s; {name} "
                        f"is {child.out_features} x {child.in_features}: use --quantize=int8")
                setattr(parent, name, kind_class(child))
    return model


def num_weights(model):
    """The parameter count of a model for_decoding may have quantized, as nanoGPT counts it before: its parameters and
    each quantized matrix's out x in (a head tied to the embedding counted once)."""
    quantized = {n: m for n, m in model.named_modules() if isinstance(m, (Int8Linear, Int4Linear))}
    n = model.num_params() + sum(m.out_features * m.in_features for m in quantized.values())
    return n - (model.lm_head.out_features * model.lm_head.in_features if "lm_head" in quantized and
                model.config.tie_weights else 0)
