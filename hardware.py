"""
The device and the precision, decided once per script: which device (cuda > mps > cpu), which dtype (auto: bfloat16
where it computes faster), the autocast context, and a GPU's peak FLOP/s for MFU. Not run by itself.
"""

from contextlib import nullcontext

import torch

from errors import die

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# what --dtype means in every script, for its --help
DTYPE_HELP = "the precision the model computes in: float32 | bfloat16 | float16 | auto (bfloat16 on GPUs that have it)"
# dtype=auto on a CPU with bfloat16 units trains in bfloat16 from this width and tokens per micro-step up: measured on
# a 2-core Sapphire Rapids VM, bf16/fp32 step time was 0.47 at 6x384 (4,096 tokens), 0.66 at 2x256, 0.82 at 4x192,
# 0.87-1.28 at 128 wide and 0.95 at 96 (BENCHMARKS.md)
BF16_CPU_WIDTH, BF16_CPU_TOKENS = 192, 2048
# dense bf16 peak FLOP/s per GPU, matched against torch.cuda.get_device_name() for MFU
PEAK_FLOPS = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "L4": 121e12, "A10": 125e12,
              "4090": 165e12, "3090": 71e12, "V100": 125e12, "T4": 65e12}


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
