"""
Every read and write of a checkpoint, and where a model comes from, in one place: the atomic .pt write and the
weights-only read, sharded (DCP) folders (FSDP's and DCP's modules imported where used: ~0.5 s saved elsewhere), the
sources a script accepts (a run folder or checkpoint of ours, a LoRA run's, nanoGPT's, the hub's, a Hugging Face
folder, a GGUF file) read into one Source, the model built from it, the loading of the scripts that run a model, and
what a resume puts back. Not run by itself."""

import os
import random
import shutil
import warnings
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.distributed as dist

from dataset import atomic_write, read_json
from errors import die
from gguf_file import read_gguf
from hf import HUB_MODELS, PIP_HF, from_hf, from_hf_folder, hub_folder, model_config
from hf_tokenizer import GPT2_META
from lora import load_base, merged
from model import GPT, MODEL_FIELDS, config_from_dict
from nanogpt import from_nanogpt, strip_compiled
from parallel import is_sharded
from warmstart import adopt, warm_start

TRAIN_STATE = "train.pt"  # beside the shards in a sharded (DCP) checkpoint folder: config, counters, RNG, tokenizer
SOURCES = "a run folder, a checkpoint file, gpt2 | gpt2-medium | gpt2-large | gpt2-xl, hf:ORG/NAME, hf:DIR, gguf:FILE"


@dataclass
class Source:
    """A model read from anywhere (load_source): what builds it, and for a training run's checkpoint what resumes it."""
    model_config: dict  # GPTConfig's fields
    model: dict | None  # the weights in our names; None: a sharded checkpoint's, still in its shards
    meta: dict | None = None  # the tokenizer (as a dataset's meta.json), None when unknown
    path: str = ""  # the file or folder it was read from
    ema: dict | None = None  # a run's moving average of the weights (an AveragedModel's state dict)
    state: dict | None = None  # a run's training state: config, optimizers, scaler, rng, iter_num, best_val_loss, ...
    shards: tuple = field(default_factory=tuple)  # what a sharded folder keeps in its shards: model, optimizers, ema
    lora: dict | None = None  # a LoRA run's adapter settings, base source and digest, and its adapters' tensors


# -----------------------------------------------------------------------------
# .pt files: written atomically, read as plain data only


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


def resolve_checkpoint(out_dir, name=""):
    """out_dir/name, defaulting to the latest checkpoint (ckpt.pt, or the sharded ckpt/ that train.py
    --parallel=fsdp writes, or ckpt.old/ that an interrupted save left) and then the best (best.pt, best/)."""
    if name:
        return os.path.join(out_dir, name)
    found = [p for p in (os.path.join(out_dir, n) for n in ("ckpt.pt", "ckpt", "ckpt.old", "best.pt", "best"))
             if os.path.isfile(p) or os.path.isfile(os.path.join(p, TRAIN_STATE))]
    return found[0] if found else os.path.join(out_dir, "ckpt.pt")


def load_source(spec, meta_path="", name="", weights=True, merge=True):
    """The Source `spec` names: gpt2* (the hub), hf:FOLDER or a Hugging Face folder, gguf:FILE, a run folder (its
    checkpoint `name`, see resolve_checkpoint) or a checkpoint file, ours or nanoGPT's. weights=False leaves a sharded
    checkpoint's weights in its shards (model None: train.py loads them into its model as it is sharded). A LoRA
    run's base is read again from its source: its adapters merged in, or with merge=False beside it (a resume)."""
    if spec in HUB_MODELS or spec.startswith("hf:") or os.path.isfile(os.path.join(spec, "config.json")):
        folder = hub_folder(spec)
        config, weights, meta = from_hf_folder(folder, read_hf_weights)
        return Source(config, weights, dict(GPT2_META) if spec in HUB_MODELS else meta, folder)
    if spec.startswith("gguf:"):
        config, tensors, meta, path = read_gguf(spec)
        arch, cfg = model_config(config, path)
        return Source(vars(cfg), from_hf(cfg, tensors, arch, path), meta, path)
    if not os.path.exists(spec):
        die(f"{spec} not found; give {SOURCES} (train one first: python train.py ...)")
    path = resolve_checkpoint(spec, name) if os.path.isdir(spec) and not os.path.isfile(
        os.path.join(spec, TRAIN_STATE)) else spec
    if os.path.isfile(os.path.join(path, TRAIN_STATE)):
        return from_sharded(path, weights)
    ckpt = load_checkpoint(path)
    if "model_args" in ckpt:
        return Source(*from_nanogpt(ckpt, path, meta_path), path)
    if not isinstance(ckpt, dict) or "model_config" not in ckpt or "model" not in ckpt:
        die(f"{path} is neither a yoctoGPT nor a nanoGPT checkpoint (it has no model_config or model_args)")
    state = {k: v for k, v in ckpt.items() if k not in ("model", "model_config", "meta", "ema")}
    config, model, lora = ckpt["model_config"], strip_compiled(ckpt["model"]), None
    if ckpt.get("lora"):  # the adapters alone: the base from its source, checked against its digest
        lora = dict(ckpt["lora"], adapters=model)
        config, model = load_base(ckpt, path, load_source)
        config, model = merged(config, model, lora, lora["adapters"]) if merge else (config, model)
    return Source(config, model, ckpt.get("meta"), path, ckpt.get("ema"), state if "optimizers" in ckpt else None,
                  lora=lora)


def from_sharded(folder, weights=True):
    """A sharded (DCP) checkpoint folder as a Source: its training state, and the weights gathered whole (or left in
    the shards)."""
    saved = load_checkpoint(os.path.join(folder, TRAIN_STATE))
    shards = tuple(saved.get("shards", ()))
    state = {k: v for k, v in saved.items() if k not in ("model", "model_config", "meta", "ema", "shards")}
    record = Source(saved["model_config"], None, saved.get("meta"), folder, None, state, shards)
    if not weights:
        return record
    record.model = build_model(record, "cpu", strict=False).state_dict()
    ema = {"module." + k: v.clone() for k, v in record.model.items()} | dict(n_averaged=torch.tensor(0))
    try:
        dcp_load(dict(model=record.model) | (dict(ema=ema) if "ema" in shards else {}), folder)
    except Exception as e:  # missing or damaged shards
        die(f"{folder} is not a readable sharded checkpoint ({type(e).__name__}: {str(e).splitlines()[0][:160]})")
    record.ema = ema if "ema" in shards else None
    return record


def read_hf_weights(folder):
    """Every tensor of a Hugging Face folder: model.safetensors (or its shards), else pytorch_model.bin."""
    index = os.path.join(folder, "model.safetensors.index.json")
    files = [os.path.join(folder, "model.safetensors")]
    if os.path.isfile(index):
        weight_map = read_json(index, "safetensors index", "download the model folder again").get("weight_map", {})
        files = sorted({os.path.join(folder, v) for v in weight_map.values()})
    if not os.path.isfile(files[0]):
        bin_path = os.path.join(folder, "pytorch_model.bin")
        if os.path.isfile(bin_path):
            return load_checkpoint(bin_path)
        die(f"{folder} has no model.safetensors (or pytorch_model.bin)")
    try:
        from safetensors.torch import load_file
    except ImportError:
        die(f"reading {files[0]} needs safetensors: {PIP_HF}")
    tensors = {}
    for path in files:
        try:
            tensors.update(load_file(path))
        except Exception as e:  # truncated or not safetensors
            die(f"{path} is not a readable safetensors file ({type(e).__name__}: {str(e)[:160]})")
    return tensors


# -----------------------------------------------------------------------------
# the model built from a source, and the scripts that run one


def build_model(record, device, strict=True, **overrides):
    """The model, any variant, rebuilt from a Source's stored config (fields overridden, e.g. dropout), with its
    weights (none: a sharded checkpoint's, loaded later), on device (meta: no memory, for parallel.shard). The model
    takes record.model's tensors as its own (on the CPU, in float32: no copy), so training it changes them."""
    try:
        with torch.device("meta" if record.model is not None else device):
            model = GPT(config_from_dict({**record.model_config, **overrides}))
        if record.model is not None:
            adopt(model, record.model, device, strict)
    except (KeyError, TypeError, ValueError, RuntimeError) as e:
        die(f"the checkpoint does not match this model code ({type(e).__name__}: {str(e).splitlines()[0][:200]})")
    return model


def shortened(record, block_size):
    """The Source with a context of block_size (a smaller KV cache; learned positions cropped, never grown)."""
    try:
        config, record.model = warm_start(record, dict(block_size=block_size))
    except ValueError as e:
        die(str(e))
    record.model_config = vars(config)
    return record


# -----------------------------------------------------------------------------
# a resumed run: its settings, its optimizer, scaler, RNG and EMA states


def resumed_config(record, config, explicit):
    """A resumed run continues as it was: every setting not given now comes from the checkpoint (out_dir never: a
    run writes only where it was started), and one given that would change the architecture or the data stops it."""
    if record.state is None:
        die(f"{record.path} holds a model but no training state (convert.py or nanoGPT wrote it); warm-start "
            f"from it instead: --init_from={record.path} --out_dir=NEW")
    keep = explicit | {"init_from", "device", "eval_only", "overwrite", "out_dir"}
    saved = record.state["config"]
    config = {k: saved[k] if k in saved and k not in keep else v for k, v in config.items()}
    for key in sorted(explicit & (set(MODEL_FIELDS) | {"model_type", "dataset"}) - {"dropout"}):
        was = saved[key] if key in ("model_type", "dataset") else record.model_config[key]
        if config[key] is not None and config[key] != was:
            die(f"--{key}={config[key]!r} differs from the checkpoint's {was!r}; a resumed run keeps its "
                f"architecture and data: drop the setting or start a new --out_dir")
    return dict(config, init_from="resume")


def restore_training(record, model, optimizers, scaler, ema, rank, device_type, optimizer):
    """Put a resumed run's optimizer, grad-scaler, RNG and EMA states back (a sharded checkpoint's weights and
    optimizer state too, however this run is sharded; a whole checkpoint's into a sharded run, too)."""
    state = record.state
    if record.shards:
        load_sharded(record.path, model, optimizers, ema if "ema" in record.shards else None)
    try:
        states = [] if record.shards else state["optimizers"] or []  # (sharded: loaded above; None: not kept)
        assert not states or len(optimizers) == len(states)
        if states and is_sharded(model):  # a whole ckpt.pt into parallel=fsdp
            load_whole_optimizers(model, optimizers, states)
        else:
            for opt, saved in zip(optimizers, states, strict=False):
                opt.load_state_dict(saved)
    except (AssertionError, ValueError, KeyError, RuntimeError):
        die(f"the optimizer state in {record.path} does not fit optimizer={optimizer!r}; resume with the optimizer "
            f"the run was trained with ({state['config']['optimizer']!r}), or warm-start a new run: "
            f"--init_from={record.path} --out_dir=NEW")
    scaler.load_state_dict(state["scaler"])
    restore_rng(state["rng"], rank, device_type)
    if ema is not None and record.ema is not None and not record.shards:  # a run that already kept one
        load_whole(ema, record.ema)
    elif ema is not None and record.ema is None and "ema" not in record.shards:  # a new average from these weights
        for average, p in zip(ema.module.parameters(), model.parameters(), strict=True):
            average.detach().copy_(p.detach())


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


# -----------------------------------------------------------------------------
# sharded checkpoints (DCP): any world size resumes them


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
