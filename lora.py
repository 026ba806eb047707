"""
LoRA: low-rank adapters on a frozen base (Hu et al., 2021, in peft's layout), and the frozen base in less memory:
bfloat16, or int8 with one scale per row, dequantized a matrix at a time in the forward and again in the backward
(QLoRA's idea at 8 bits; torch has no 4-bit CPU kernel with a backward). train.py attaches them with --lora_rank;
its run folder then keeps the adapters only, with their settings and the base's source and a digest of its weights;
checkpoint.load_source merges them into the base for every script that reads the run, and convert.py --to=peft writes
them as a PEFT adapter folder. Not run by itself.

    python train.py config/lora_smollm.py
"""

import hashlib
import math
import os
from contextlib import contextmanager

import torch
import torch.nn as nn
import torch.nn.functional as F

from configurator import ABOVE_ZERO, FRACTION, NON_NEGATIVE
from errors import die
from warmstart import warm_start

TARGETS = {"attn": ("attn.c_attn", "attn.c_proj"), "mlp": ("mlp.c_fc", "mlp.c_proj"), "head": ("lm_head",)}
BASES = ("", "bfloat16", "int8")
SLAB = 4096  # rows quantized at a time
LORA_SETTINGS = dict(
    lora_rank=(0, NON_NEGATIVE, "LoRA: the adapters' rank; 0 = off (every weight trains)"),
    lora_alpha=(16.0, ABOVE_ZERO, "LoRA: the adapters' update is scaled by lora_alpha / lora_rank"),
    lora_dropout=(0.0, FRACTION, "LoRA: dropout on the adapters' input"),
    lora_targets=("attn,mlp", (lambda v: bool(v) and set(v.split(",")) <= set(TARGETS), "attn, mlp or head, joined "
                                                                                            "by commas"),
                  "LoRA: the matrices that get adapters: attn (q/k/v and output), mlp (both), head"),
    lora_base=("", (lambda v: v in BASES, "'', bfloat16 or int8"),
               "LoRA: the frozen base in memory: '' as loaded (float32), bfloat16, int8 (a scale per row)"))


def check(config, grown):
    """One line for a setting LoRA does not go with; None when it goes."""
    if config["parallel"] == "fsdp":
        return "--lora_rank trains under DDP (torchrun) or one process; FSDP shards whole weights: drop --parallel=fsdp"
    if config["optimizer"] != "adamw":
        return "LoRA's adapters train with AdamW (Muon orthogonalises whole matrices, not rank-r factors): " \
               "use --optimizer=adamw"
    if config["ema_decay"]:
        return "--ema_decay averages whole weights; with LoRA leave it 0"
    if grown:
        return "LoRA keeps the base's vocabulary frozen; prepare the data with the base's own tokenizer"
    if config["init_from"] == "scratch":
        return "LoRA adapts a trained model: give --init_from (gpt2, hf:..., gguf:..., a run folder)"


def dequantize(q, scale, dtype):
    w = q.to(dtype)  # (int8: a new tensor, scaled in place: one temporary the matrix's size, not two)
    return w if scale is None else w.mul_(scale.to(dtype)[:, None])


class FrozenProduct(torch.autograd.Function):
    """x @ W.T (+ bias) for a frozen W kept as q (and a scale per row): saves q, not the dequantized W, for the
    backward, which dequantizes it again for the input's gradient."""

    @staticmethod
    def forward(ctx, x, q, scale, bias):
        ctx.save_for_backward(q, scale)
        return F.linear(x, dequantize(q, scale, x.dtype), None if bias is None else bias.to(x.dtype))

    @staticmethod
    def backward(ctx, grad):
        q, scale = ctx.saved_tensors
        return grad @ dequantize(q, scale, grad.dtype), None, None, None


def stored(w, kind):
    """(q, scale) of a frozen matrix: as it is (float32), in bfloat16, or int8 with each row's largest at 127."""
    w = w.detach()
    if kind != "int8":
        return (w.to(torch.bfloat16) if kind else w), None
    q, scale = torch.empty(w.shape, dtype=torch.int8, device=w.device), torch.empty(len(w), device=w.device)
    for i in range(0, len(w), SLAB):  # a slab of rows at a time, into q: no temporary the size of an embedding
        rows = w[i:i + SLAB].float()
        s = scale[i:i + SLAB] = rows.abs().amax(dim=1).clamp_(min=1e-12) / 127
        q[i:i + SLAB] = (rows / s[:, None]).round_().clamp_(-127, 127)
    return q, scale


class FrozenLinear(nn.Module):
    """A frozen nn.Linear kept in `kind` (see stored); `weight` is its float32 matrix (the chunked loss reads the
    head's)."""

    def __init__(self, linear, kind, storage=None):
        super().__init__()
        q, scale = storage or stored(linear.weight, kind)
        self.register_buffer("q", q)
        self.register_buffer("scale", scale)
        self.register_buffer("bias", None if linear.bias is None else linear.bias.detach())

    @property
    def weight(self):
        return dequantize(self.q, self.scale, torch.float32)

    def forward(self, x):  # (on rows: the custom function's output is no view, so LoRALinear may add to it in place)
        return FrozenProduct.apply(x.reshape(-1, x.size(-1)), self.q, self.scale, self.bias).view(*x.shape[:-1], -1)


class FrozenEmbedding(nn.Module):
    """A frozen nn.Embedding kept in `kind`: only the rows looked up are dequantized."""

    def __init__(self, embedding, kind):
        super().__init__()
        q, scale = stored(embedding.weight, kind)
        self.register_buffer("q", q)
        self.register_buffer("scale", scale)

    def forward(self, idx):
        rows = self.q[idx].float()
        return rows if self.scale is None else rows * self.scale[idx][..., None]


class LoRALinear(nn.Module):
    """base(x) + (dropout(x) @ A.T @ B.T) * alpha / rank: B starts at zero, so the model starts as the base."""

    def __init__(self, base, rank, alpha, dropout):
        super().__init__()
        out_features, in_features = base.q.shape
        self.base, self.scaling = base, alpha / rank
        self.dropout = nn.Dropout(dropout) if dropout else nn.Identity()
        self.lora_A = nn.Parameter(torch.empty(rank, in_features, device=base.q.device))  # peft's init
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.lora_B = nn.Parameter(torch.zeros(out_features, rank, device=base.q.device))

    @property
    def weight(self):  # the merged matrix
        return self.base.weight + self.scaling * self.lora_B @ self.lora_A

    def forward(self, x):
        return self.base(x).add_(F.linear(F.linear(self.dropout(x), self.lora_A), self.lora_B), alpha=self.scaling)


def attach(model, config):
    """Freeze the model, keep its matrices (and token embedding) as config's lora_base says, and put adapters on
    lora_targets' matrices; returns the number of trainable parameters."""
    kind, rank = config["lora_base"], config["lora_rank"]
    suffixes = tuple(s for t in config["lora_targets"].split(",") for s in TARGETS[t])
    model.requires_grad_(False)
    tied = model.lm_head.weight is model.transformer.wte.weight
    if kind:
        model.transformer.wte = FrozenEmbedding(model.transformer.wte, kind)
    for name in [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]:  # (names: each freed as replaced)
        shared = (model.transformer.wte.q, model.transformer.wte.scale) if tied and kind and name == "lm_head" else None
        new = FrozenLinear(model.get_submodule(name), kind, shared)
        if name.endswith(suffixes):
            new = LoRALinear(new, rank, config["lora_alpha"], config["lora_dropout"])
        parent, _, leaf = name.rpartition(".")
        setattr(model.get_submodule(parent), leaf, new)
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


@contextmanager
def adapters_off(model):
    """The base alone inside the block (every adapter's update scaled by 0): DPO's reference without a second copy."""
    layers = [m for m in model.modules() if isinstance(m, LoRALinear)]
    scalings = [m.scaling for m in layers]
    for m in layers:
        m.scaling = 0.0
    try:
        yield model
    finally:
        for m, scaling in zip(layers, scalings, strict=True):
            m.scaling = scaling


def adapters(model):
    """The adapters' tensors of a model attach() made, by name (what a LoRA run's checkpoint keeps)."""
    return {k: v for k, v in model.state_dict().items() if ".lora_" in k}


def digest(weights):
    """A digest of a state dict's tensors (names and bytes): a LoRA run checks its base against it."""
    h = hashlib.sha256()
    for name in sorted(weights):
        t = weights[name].detach().cpu().contiguous()
        h.update(name.encode())
        h.update(t.view(torch.uint8).numpy() if t.numel() else b"")
    return h.hexdigest()


def summary(config, source):
    """What a LoRA run's checkpoint says of its adapters: the settings, the base's source and digest."""
    keys = ("lora_rank", "lora_alpha", "lora_dropout", "lora_targets", "lora_base")
    spec = config["init_from"]  # a file or folder here: by its absolute path, so the run loads from anywhere
    prefix = next(p for p in ("hf:", "gguf:", "") if spec.startswith(p))
    if os.path.exists(spec.removeprefix(prefix)):
        spec = prefix + os.path.abspath(spec.removeprefix(prefix))
    return dict({k.removeprefix("lora_"): config[k] for k in keys}, source=spec, digest=digest(source))


def load_base(ckpt, path, load):
    """(model_config, base weights) of a LoRA run's checkpoint: the base read with load(spec) from the source it
    names, checked against its digest, shaped as the run trained it (its context)."""
    info = ckpt["lora"]
    base = load(info["source"])
    if digest(base.model) != info["digest"]:
        die(f"{path} holds LoRA adapters for {info['source']} as it was when trained (digest {info['digest'][:12]}), "
            f"but {info['source']} now has other weights; give the run the base it was trained on")
    try:
        cfg, weights = warm_start(base, ckpt["model_config"])  # (its context, dropout: as the run had them)
    except ValueError as e:
        die(str(e))
    return vars(cfg), weights


def merged(config, weights, info, adapters_):
    """(config, weights) with each adapter's update added into its matrix: a plain model, as the LoRA run computes
    (an adapted head tied to the embedding is untied first)."""
    weights, config = dict(weights), dict(config)
    for key in (k for k in adapters_ if k.endswith(".lora_A")):
        module = key.removesuffix(".lora_A")
        delta = adapters_[module + ".lora_B"].float() @ adapters_[key].float() * (info["alpha"] / info["rank"])
        if module == "lm_head" and config["tie_weights"]:
            config["tie_weights"] = False
        weights[module + ".weight"] = weights[module + ".weight"].float() + delta
    return config, weights


def export_peft(source, dest):
    """dest, a PEFT adapter folder (adapter_config.json, adapter_model.safetensors) of a LoRA run (a Source read with
    merge=False): peft's PeftModel.from_pretrained(base, dest), on the base as transformers loads it (convert.py
    --to=hf of the base), computes our logits. A fused matrix of ours (q/k/v; gate/up) is split as hf.py splits the
    weights: each part gets the same A and its rows of B."""
    from dataset import make_out_dir, write_json
    from hf import PIP_HF, hf_arch, layout
    from model import config_from_dict
    if not source.lora:
        die(f"{source.path} holds no LoRA adapters (train with --lora_rank=8, say); --to=hf exports any run whole")
    try:
        from safetensors.torch import save_file
    except ImportError:
        die(f"--to=peft writes adapter_model.safetensors, which needs safetensors: {PIP_HF}")
    cfg = config_from_dict(source.model_config)
    arch, info, found = hf_arch(cfg), source.lora, source.lora["adapters"]
    rows = {ours: (theirs, kind, sizes) for ours, theirs, kind, sizes in layout(cfg, arch) if ours}
    tensors = {}
    for key in sorted(k for k in found if k.endswith(".lora_A")):
        module = key.removesuffix(".lora_A")
        theirs, kind, sizes = rows.get(module + ".weight", (["lm_head.weight"], "copy", None))  # (a tied head)
        parts = found[module + ".lora_B"].split(sizes) if kind == "cat" else [found[module + ".lora_B"]]
        for name, b in zip(theirs, parts, strict=True):
            stem = "base_model.model." + name.removesuffix(".weight")
            tensors[stem + ".lora_A.weight"] = found[key].float().contiguous().clone()
            tensors[stem + ".lora_B.weight"] = b.float().contiguous().clone()
    make_out_dir(dest, "--dest")
    targets = sorted({k.removeprefix("base_model.model.").removesuffix(".lora_A.weight") for k in tensors
                      if k.endswith(".lora_A.weight")})
    write_json(f"{dest}/adapter_config.json", dict(
        peft_type="LORA", task_type="CAUSAL_LM", r=info["rank"], lora_alpha=info["alpha"],
        lora_dropout=info["dropout"], target_modules=targets, bias="none", fan_in_fan_out=arch == "gpt2",
        base_model_name_or_path=info["source"], inference_mode=True, use_rslora=False, modules_to_save=None))
    save_file(tensors, f"{dest}/adapter_model.safetensors", metadata={"format": "pt"})
    print(f"wrote {dest}: LoRA rank {info['rank']} on {len(targets)} {arch} matrices, for the base {info['source']}")
