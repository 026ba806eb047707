"""
What train.py, sample.py and chat.py share: picking the device and precision, reading a prepared
dataset's meta.json, writing and reading checkpoints, and a training run's safety (the out_dir lock, signals,
RNG states, metrics.csv). Not run by itself.
"""

import csv
import json
import os
import random
import signal
import sys
from contextlib import nullcontext

try:
    import fcntl  # POSIX advisory locks; Windows runs without the out_dir lock
except ImportError:
    fcntl = None

import numpy as np
import torch

from configurator import ABOVE_ZERO, FRACTION, NON_NEGATIVE, POSITIVE, UNIT, die
from model import GPT, MODEL_FIELDS, GPTConfig
from tokenizer import load_tokenizer

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# dense bf16 peak FLOP/s per GPU, matched against torch.cuda.get_device_name() for MFU
PEAK_FLOPS = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "L4": 121e12, "A10": 125e12,
              "4090": 165e12, "3090": 71e12, "V100": 125e12, "T4": 65e12}
SAMPLING_RULES = dict(max_new_tokens=POSITIVE, temperature=NON_NEGATIVE, top_k=NON_NEGATIVE, top_p=UNIT, min_p=FRACTION,
                      repetition_penalty=ABOVE_ZERO, no_repeat_ngram_size=NON_NEGATIVE)  # sample.py, chat.py


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
    """The GPU's name and its dense bf16 peak FLOP/s from PEAK_FLOPS, for MFU ('' and 0 off CUDA; 0 for a GPU not listed)."""
    name = torch.cuda.get_device_name(device) if device.startswith("cuda") else ""
    return name, next((f for key, f in PEAK_FLOPS.items() if key in name), 0.0)


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
        if name == "pydocs_gpt2":  # train.py's defaults: a GPT-2-small run wants a real corpus
            hint += " (0.5 MB of docs; for a real GPT-2-small run see the README's recipe: a large corpus with --input)"
        die(f"{path} not found; prepare the dataset first: {hint} (--input=FILE/FOLDER for your own text)")
    try:
        with open(path, encoding="utf-8") as f:
            meta = json.load(f)
        assert isinstance(meta, dict) and meta.get("tokenizer") in ("char", "bpe", "gpt2")
        assert meta["dtype"] in ("uint16", "uint32") and int(meta["vocab_size"]) >= 1
        assert meta["tokenizer"] != "char" or len(meta["vocab"]) == meta["vocab_size"]
    except (OSError, ValueError, AssertionError, KeyError, TypeError):
        die(f"{path} is not a valid dataset meta.json (unreadable, not JSON, or a tokenizer, vocab_size or dtype "
            f"(uint16/uint32) it cannot have); prepare the dataset again")
    return meta


def read_dataset(data_dir):
    """read_meta() and the dataset's tokenizer; a BPE's tokenizer.json goes into meta['tokenizer_json'], so the
    checkpoints that carry meta can decode with out_dir alone."""
    meta = read_meta(data_dir)
    try:
        if meta["tokenizer"] == "bpe":
            with open(os.path.join(data_dir, meta.get("tokenizer_file", "tokenizer.json")), encoding="utf-8") as f:
                meta["tokenizer_json"] = f.read()
        return meta, load_tokenizer(meta)
    except Exception as e:  # missing, or not a tokenizer.json
        die(f"{data_dir}'s tokenizer cannot be read ({type(e).__name__}: {e}); prepare the dataset again")


def write_vocab(out_dir, meta):
    """A run folder's meta.json (and tokenizer.json for a BPE): what sample.py and chat.py decode with."""
    with open(os.path.join(out_dir, "meta.json"), "w", encoding="utf-8") as f:
        json.dump({k: v for k, v in meta.items() if k != "tokenizer_json"}, f, ensure_ascii=False, indent=1)
    if "tokenizer_json" in meta:
        with open(os.path.join(out_dir, "tokenizer.json"), "w", encoding="utf-8") as f:
            f.write(meta["tokenizer_json"])


def save_checkpoint(obj, path):
    """torch.save to a temporary file beside `path`, flushed to the disk, then an atomic rename (and the folder
    flushed): a crash, a power loss or a full disk mid-write never leaves a broken checkpoint, and the previous
    one stays until the new one is whole."""
    tmp = path + ".tmp"
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        if hasattr(os, "O_DIRECTORY"):  # the rename itself reaches the disk (POSIX)
            fd = os.open(os.path.dirname(os.path.abspath(path)), os.O_DIRECTORY)
            os.fsync(fd)
            os.close(fd)
    except (OSError, RuntimeError) as e:  # a full disk, a read-only or vanished folder
        die(f"could not write {path} ({getattr(e, 'strerror', None) or e}); free some space or fix the folder, then "
            f"resume: the previous checkpoint is kept")
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def load_checkpoint(path):
    """Read a checkpoint with weights_only=True (tensors, numbers, strings, lists, dicts only)."""
    if not os.path.isfile(path):
        die(f"checkpoint {path} not found; train one first (python train.py ...) or check --out_dir")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated, corrupt, or objects beyond plain data: never unpickled
        die(f"{path} is not a readable checkpoint ({type(e).__name__}): it is truncated, corrupt, or holds more than "
            f"tensors and plain data, which are never unpickled; use another checkpoint")


def resumed_config(ckpt, path, config, explicit):
    """A resumed run continues as it was: every setting not given now comes from the checkpoint (out_dir never: a run
    writes only where it was started), and one given that would change the architecture or the data stops it."""
    if "optimizers" not in ckpt:
        die(f"{path} holds a model but no training state (convert.py or nanoGPT wrote it); warm-start from "
            f"it instead: --init_from={path} --out_dir=NEW")
    keep = explicit | {"init_from", "device", "eval_only", "overwrite", "out_dir"}
    config = {k: ckpt["config"][k] if k in ckpt["config"] and k not in keep else v for k, v in config.items()}
    for key in sorted(explicit & (set(MODEL_FIELDS) | {"model_type", "dataset"}) - {"dropout"}):
        saved = ckpt["config"][key] if key in ("model_type", "dataset") else ckpt["model_config"][key]
        if config[key] is not None and config[key] != saved:
            die(f"--{key}={config[key]!r} differs from the checkpoint's {saved!r}; a resumed run keeps its "
                f"architecture and data: drop the setting or start a new --out_dir")
    return dict(config, init_from="resume")


def start_wandb(project, name, config):
    """wandb.init, or one line saying how to install it; returns the wandb module for wandb.log."""
    try:
        import wandb
    except ImportError:
        die("wandb_log=True needs wandb: pip install wandb (or run with --wandb_log=False)")
    wandb.init(project=project, name=name, config=config)
    return wandb


def lock_out_dir(out_dir, probe=False):
    """Make out_dir and hold an exclusive lock on out_dir/.lock for the whole run (the OS drops it when the
    process ends, however it ends). Returns (the open lock file, None) or (None, the line saying why not).
    probe=True only looks, creating nothing: (None, that line) if another run holds out_dir, else (None, None)."""
    path = os.path.join(out_dir, ".lock")
    if probe and not os.path.isfile(path):
        return None, None
    try:
        os.makedirs(out_dir, exist_ok=True)
        f = open(path, "a+", encoding="utf-8")
    except OSError as e:
        return None, f"--out_dir={out_dir} cannot be used ({e.strerror}); pick another --out_dir"
    if fcntl is not None:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            f.seek(0)
            pid = f.read().strip() or "unknown"
            f.close()
            return None, (f"{out_dir} is in use by another train.py (PID {pid}); wait for it to finish, stop it, "
                          f"or pick another --out_dir")
    if probe:
        f.close()
        return None, None
    f.seek(0)
    f.truncate()
    f.write(str(os.getpid()))
    f.flush()
    return f, None


def make_optimizers(model, cfg, fused=False):
    """train.py's optimizers from its settings (cfg): AdamW for every parameter, or with optimizer="muon"
    torch.optim.Muon for the 2-D matrices inside the blocks and AdamW for the rest (embeddings, head, norms, biases).
    Weight decay on AdamW's matrices only; each group keeps its peak LR in base_lr for the schedule to scale.
    Returns (optimizers, Muon's parameter names, AdamW's)."""
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    muon = [n for n, p in params.items() if cfg["optimizer"] == "muon" and n.startswith("transformer.h.") and p.dim() == 2]
    adam = [n for n in params if n not in muon]
    lr = cfg["learning_rate"]
    groups = [dict(params=[params[n] for n in adam if params[n].dim() >= 2], weight_decay=cfg["weight_decay"], base_lr=lr),
              dict(params=[params[n] for n in adam if params[n].dim() < 2], weight_decay=0.0, base_lr=lr)]
    optimizers = [torch.optim.AdamW(groups, lr=lr, betas=(cfg["beta1"], cfg["beta2"]), eps=cfg["eps"], fused=fused)]
    if muon:
        optimizers.append(torch.optim.Muon([dict(params=[params[n] for n in muon], base_lr=cfg["muon_lr"])],
                                           lr=cfg["muon_lr"], weight_decay=cfg["muon_weight_decay"],
                                           momentum=cfg["muon_momentum"], ns_steps=cfg["muon_ns_steps"]))
    return optimizers, muon, adam


def split_batch(tokens, batch_size, block_size, world_size):
    """(micro-batch, micro-steps per process) for `tokens` per optimizer step shared by world_size processes: the
    largest micro-batch up to batch_size that divides each process's share of sequences."""
    seqs, rest = divmod(tokens, block_size * world_size)  # sequences per process per step
    if rest or not seqs:
        raise ValueError(f"{tokens:,} tokens per step do not split into whole sequences of block_size={block_size} over "
                         f"{world_size} process(es); make total_batch_size (or batch_size*block_size*"
                         f"gradient_accumulation_steps) a multiple of {block_size * world_size:,}")
    micro = max(b for b in range(1, min(batch_size, seqs) + 1) if seqs % b == 0)
    return micro, seqs // micro


def write_run_meta(path, iter_num, info):
    """run_meta.json: what a run was started with; a resume (iter_num > 0) keeps that and adds itself to `resumed`."""
    if iter_num and os.path.isfile(path):
        with open(path, encoding="utf-8") as f:
            first = json.load(f)
        first.setdefault("resumed", []).append(dict(iter=iter_num, **{k: info[k] for k in ("argv", "device", "world_size")}))
        info = first
    with open(path, "w", encoding="utf-8") as f:
        json.dump(info, f, indent=1)


def check_bins(data_dir, meta, block_size):
    """Stop with one line unless data_dir's bins are whole, long enough for a window, within the vocabulary and, for
    conversations, have masks and starts that match and some reply within a window of a conversation's start."""
    dtype = np.dtype(meta["dtype"])
    for split in ("train", "val"):
        path = os.path.join(data_dir, f"{split}.bin")
        size = os.path.getsize(path) if os.path.isfile(path) else -1
        if size < 0 or size % dtype.itemsize:
            die(f"{path} is {'missing' if size < 0 else 'not a whole number of ' + meta['dtype'] + ' tokens'}; prepare the dataset again")
        if size // dtype.itemsize <= block_size and "chat_template" not in meta:  # conversations are padded
            die(f"{path} has {size // dtype.itemsize} tokens, fewer than block_size+1={block_size + 1}; lower --block_size")
        if (top := int(np.memmap(path, dtype=dtype, mode="r")[:1 << 20].max())) >= meta["vocab_size"]:  # get_batch checks the rest
            die(f"{path} holds token id {top}, beyond meta.json's vocab_size={meta['vocab_size']}; prepare the dataset again")
        if "chat_template" not in meta:
            continue
        mask, starts = (os.path.join(data_dir, f"{split}_{part}.bin") for part in ("mask", "starts"))
        if not (os.path.isfile(mask) and os.path.isfile(starts) and os.path.getsize(mask) == size // dtype.itemsize):
            die(f"{mask} or {starts} is missing or does not match {split}.bin; prepare the dataset again")
        loss_mask = np.memmap(mask, mode="r")
        if not any(loss_mask[s + 1:s + block_size + 1].any() for s in np.fromfile(starts, np.int64, count=1000)):
            die(f"in {path} no reply starts within block_size={block_size} tokens of its conversation's start, so there is "
                f"nothing to learn; raise --block_size")


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


def open_metrics(path, fields, upto):
    """metrics.csv, open for appending: new with its header, or cut back to the rows up to iteration `upto` (the
    resumed checkpoint's: rows a crash left after it would be written again)."""
    rows = []
    if upto and os.path.isfile(path):
        with open(path, newline="", encoding="utf-8") as f:
            rows = [r for r in csv.DictReader(f) if (r.get("iter") or "").isdigit() and int(r["iter"]) <= upto]
    with open(path + ".tmp", "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    os.replace(path + ".tmp", path)
    f = open(path, "a", newline="", encoding="utf-8")
    return f, csv.DictWriter(f, fieldnames=fields)


class StopSignals:
    """SIGINT (Ctrl-C) and SIGTERM for a training run. Until `training` is set they stop the script at once (nothing
    is lost); after it, they are only noted in `received`, so the loop can finish its step, save and exit."""

    def __init__(self):
        self.training, self.received = False, 0
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, self.handle)

    def handle(self, signum, frame):
        if not self.training:
            print(f"{signal.Signals(signum).name} before training started: stopped, nothing saved", file=sys.stderr)
            raise SystemExit(128 + signum)
        self.received = signum  # a second signal while saving changes nothing: the save finishes


def rng_states(ddp, world_size, device_type):
    """Every process's RNG states (python, numpy, torch, cuda), gathered for the checkpoint."""
    import torch.distributed as dist
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


def resolve_checkpoint(out_dir, name=""):
    """out_dir/name, defaulting to ckpt.pt and then best.pt."""
    if name:
        return os.path.join(out_dir, name)
    latest, best = os.path.join(out_dir, "ckpt.pt"), os.path.join(out_dir, "best.pt")
    return best if not os.path.isfile(latest) and os.path.isfile(best) else latest


def load_for_inference(out_dir, name, device, source="", ema=False):
    """(model in eval mode, tokenizer) from a training run's out_dir (or a nanoGPT one): all sample.py and
    chat.py need. ema=True takes the run's moving average of the weights (train.py --ema_decay)."""
    if source:  # OpenAI's GPT-2 (or any convert.py source) instead of a run
        from convert import load_source
        ckpt = load_source(source)
    else:
        ckpt = load_checkpoint(path := resolve_checkpoint(out_dir, name))
    if ema:
        if not ckpt.get("ema"):
            die(f"{source or path} holds no EMA weights; train with --ema_decay=0.999 (say), or drop --ema")
        ckpt["model"] = {k.removeprefix("module."): v for k, v in ckpt["ema"].items() if k != "n_averaged"}
    if "model_args" in ckpt:  # nanoGPT's: map its names and find its vocabulary in memory
        from convert import from_nanogpt
        ckpt = from_nanogpt(ckpt, path)
    model = model_from_checkpoint(ckpt, device).eval()
    try:
        tokenizer = load_tokenizer(ckpt["meta"] or {})
        tokenizer.chat_template = (ckpt["meta"] or {}).get("chat_template")  # a model fine-tuned on conversations
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
