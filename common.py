"""
What train.py, sample.py and chat.py share: picking the device and precision, reading a prepared
dataset's meta.json, and writing and reading checkpoints. Not run by itself.
"""

import json
import os
from contextlib import nullcontext

import torch

from configurator import die
from model import GPT, GPTConfig, MODEL_FIELDS
from tokenizer import load_tokenizer

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


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


def pick_dtype(dtype, device):
    """'auto' is bfloat16 on GPUs that have it, float16 on older GPUs, float32 elsewhere."""
    if dtype == "auto":
        if device.startswith("cuda"):
            return "bfloat16" if torch.cuda.is_bf16_supported() else "float16"
        return "float32"
    if dtype not in DTYPES:
        die(f"--dtype={dtype!r} is not one of auto, {', '.join(DTYPES)}")
    return dtype


def autocast(device, dtype):
    """The mixed-precision context for the forward pass: a no-op for float32."""
    if dtype == "float32":
        return nullcontext()
    return torch.autocast(device_type=device.split(":")[0], dtype=DTYPES[dtype])


def read_meta(data_dir):
    """A prepared dataset's meta.json, or one line saying how to make it."""
    path = os.path.join(data_dir, "meta.json")
    if not os.path.isfile(path):
        name = os.path.basename(os.path.normpath(data_dir))
        stem, _, kind = name.rpartition("_")
        source = "" if stem == "pydocs" else f" --input={stem or 'FILE'}"
        command = {"char": f"python prepare_char.py{source}", "bpe": f"python prepare_bpe.py{source}",
                   "gpt2": f"python prepare_bpe.py{source} --tokenizer=gpt2"}.get(kind)
        hint = f"`{command}` makes it" if command else "make it with prepare_char.py or prepare_bpe.py"
        die(f"{path} not found; prepare the dataset first: {hint} (--input=FILE/FOLDER for your own text)")
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def save_checkpoint(obj, path):
    """torch.save to a temporary file beside `path`, then an atomic rename: a crash or a full disk
    mid-write never leaves a broken checkpoint, and the previous one stays until the new one is whole."""
    tmp = path + ".tmp"
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def load_checkpoint(path):
    """Read a checkpoint with weights_only=True (tensors, numbers, strings, lists, dicts only)."""
    if not os.path.isfile(path):
        die(f"checkpoint {path} not found; train one first (python train.py ...) or check --out_dir")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # a truncated or foreign file: say which, not a traceback
        die(f"{path} is not a readable yoctoGPT checkpoint ({type(e).__name__}: {str(e).splitlines()[0][:200]})")


def resolve_checkpoint(out_dir, name=""):
    """out_dir/name, defaulting to ckpt.pt and then best.pt."""
    if name:
        return os.path.join(out_dir, name)
    latest, best = os.path.join(out_dir, "ckpt.pt"), os.path.join(out_dir, "best.pt")
    return best if not os.path.isfile(latest) and os.path.isfile(best) else latest


def load_for_inference(out_dir, name, device):
    """(model in eval mode, tokenizer) from a training run's out_dir (or a nanoGPT one): all sample.py and
    chat.py need."""
    path = resolve_checkpoint(out_dir, name)
    ckpt = load_checkpoint(path)
    if "model_args" in ckpt:  # nanoGPT's: map its names and find its vocabulary in memory
        from convert import from_nanogpt
        ckpt = from_nanogpt(ckpt, path)
    model = model_from_checkpoint(ckpt, device).eval()
    try:
        tokenizer = load_tokenizer(ckpt["meta"] or {})
    except (KeyError, ValueError) as e:
        die(f"the checkpoint in {out_dir} carries no usable tokenizer ({e}); re-train with this version, or "
            f"import the model with a tokenizer (convert.py --src=FOLDER with its tokenizer.json)")
    return model, tokenizer


def model_from_checkpoint(ckpt, device):
    """Rebuild the model, any variant, from the config stored in the checkpoint, and load its weights."""
    try:
        cfg = GPTConfig(**{k: v for k, v in ckpt["model_config"].items() if k in MODEL_FIELDS})
        model = GPT(cfg)
        model.load_state_dict({k.removeprefix("_orig_mod."): v for k, v in ckpt["model"].items()})
    except (KeyError, TypeError, ValueError, RuntimeError) as e:
        die(f"the checkpoint does not match this model code ({type(e).__name__}: {str(e).splitlines()[0][:200]})")
    return model.to(device)
