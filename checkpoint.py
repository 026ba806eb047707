"""
Where a model comes from, in one place: a loader for every source a script accepts (a run folder or checkpoint of
ours or nanoGPT's, OpenAI's GPT-2 from the hub, a Hugging Face folder), the model built from it, and what a resume
or a warm start takes from it. train.py, sample.py, chat.py, report.py and convert.py use it. Not run by itself.
"""

import os
import pickle
import sys

import torch
from tokenizers import Tokenizer

from common import is_sharded, load_checkpoint, restore_rng
from configurator import die
from dataset import read_json
from hf import GPT2_META, HUB_MODELS, IGNORED, from_hf_folder, hub_folder
from model import GPT, MODEL_FIELDS, PRESETS, GPTConfig, config_from_dict
from parallel import TRAIN_STATE, dcp_load, load_sharded, load_whole, load_whole_optimizers
from tokenizer import check_tokenizer, describe_vocab

KV_NOTE_BYTES = 2**30  # load_for_inference notes a KV cache larger than this, per sequence
SOURCES = "a run folder, a checkpoint file, gpt2 | gpt2-medium | gpt2-large | gpt2-xl, hf:ORG/NAME or hf:FOLDER"


def resolve_checkpoint(out_dir, name=""):
    """out_dir/name, defaulting to the latest checkpoint (ckpt.pt, or the sharded ckpt/ that train.py
    --parallel=fsdp writes, or ckpt.old/ that an interrupted save left) and then the best (best.pt, best/)."""
    if name:
        return os.path.join(out_dir, name)
    found = [p for p in (os.path.join(out_dir, n) for n in ("ckpt.pt", "ckpt", "ckpt.old", "best.pt", "best"))
             if os.path.isfile(p) or os.path.isfile(os.path.join(p, TRAIN_STATE))]
    return found[0] if found else os.path.join(out_dir, "ckpt.pt")


def from_sharded(folder, weights=True):
    """A sharded (DCP) checkpoint folder as a record: its training state, and the weights gathered whole (or not:
    train.py's resume loads them into its model as it is sharded, parallel.load_sharded)."""
    record = load_checkpoint(os.path.join(folder, TRAIN_STATE))
    if not weights:
        return dict(record, path=folder)
    state = build_model(dict(record, model={}), "cpu", strict=False).state_dict()
    ema = {"module." + k: v.clone() for k, v in state.items()} | dict(n_averaged=torch.tensor(0))
    try:
        dcp_load(dict(model=state) | (dict(ema=ema) if record.get("ema") == "sharded" else {}), folder)
    except Exception as e:  # missing or damaged shards
        die(f"{folder} is not a readable sharded checkpoint ({type(e).__name__}: {str(e).splitlines()[0][:160]})")
    return dict(record, model=state, path=folder) | (dict(ema=ema) if record.get("ema") == "sharded" else {})


def strip_compiled(state):
    """A state dict without torch.compile's `_orig_mod.` prefix."""
    return {k.removeprefix("_orig_mod."): v for k, v in state.items()}


def load_source(spec, meta_path="", name="", weights=True):
    """The record of the model `spec` names: gpt2* (the hub), hf:FOLDER or a Hugging Face folder, a run folder
    (its checkpoint `name`, see resolve_checkpoint) or a checkpoint file, ours or nanoGPT's. A record holds
    model_config, model (a state dict in our names) and meta (the tokenizer, or None), and for a training run's
    checkpoint its training state too (optimizers, iter_num, rng, ema, config). weights=False leaves a sharded
    checkpoint's weights on disk (model None)."""
    if spec in HUB_MODELS:  # OpenAI's GPT-2: tiktoken's tokens, as our gpt2 datasets
        return dict(from_hf_folder(hub_folder(spec)), meta=dict(GPT2_META))
    if spec.startswith("hf:") or os.path.isfile(os.path.join(spec, "config.json")):
        return from_hf_folder(hub_folder(spec))
    if not os.path.exists(spec):
        die(f"{spec} not found; give {SOURCES} (train one first: python train.py ...)")
    path = resolve_checkpoint(spec, name) if os.path.isdir(spec) and not os.path.isfile(
        os.path.join(spec, TRAIN_STATE)) else spec
    if os.path.isfile(os.path.join(path, TRAIN_STATE)):
        return from_sharded(path, weights)
    ckpt = load_checkpoint(path)
    if "model_args" in ckpt:
        return from_nanogpt(ckpt, path, meta_path)
    if not isinstance(ckpt, dict) or "model_config" not in ckpt or "model" not in ckpt:
        die(f"{path} is neither a yoctoGPT nor a nanoGPT checkpoint (it has no model_config or model_args)")
    return dict(ckpt, model=strip_compiled(ckpt["model"]), meta=ckpt.get("meta"), path=path)


def build_model(record, device, strict=True, **overrides):
    """The model, any variant, rebuilt from a record's stored config (fields overridden, e.g. dropout), with its
    weights (none: a sharded checkpoint's, loaded later), on device (meta: no memory, for parallel.shard)."""
    try:
        with torch.device(device):
            model = GPT(config_from_dict({**record["model_config"], **overrides}))
        if record["model"] is not None:
            model.load_state_dict(record["model"], strict=strict)
    except (KeyError, TypeError, ValueError, RuntimeError) as e:
        die(f"the checkpoint does not match this model code ({type(e).__name__}: {str(e).splitlines()[0][:200]})")
    return model


def load_model(spec, device, name="", ema=False, block_size=0):
    """(model in eval mode, meta, record) for any source; ema=True takes a run's moving average of the weights
    (train.py --ema_decay); block_size > 0 shortens the context (and the KV cache) below the model's."""
    record = load_source(spec, name=name)
    if ema:
        if not record.get("ema"):
            die(f"{spec} holds no EMA weights; train with --ema_decay=0.999 (say), or drop --ema")
        record["model"] = {k.removeprefix("module."): v for k, v in record["ema"].items() if k != "n_averaged"}
    if block_size:
        try:
            config, record["model"] = warm_start(record, dict(block_size=block_size))
        except ValueError as e:
            die(str(e))
        record["model_config"] = vars(config)
    return build_model(record, device).eval(), record["meta"], record


def load_for_inference(spec, device, name="", ema=False, block_size=0):
    """(model in eval mode, tokenizer): all sample.py and chat.py need; the tokenizer carries the checkpoint's meta
    (a chat template, for a model fine-tuned on conversations or imported with its own). A note on stderr when the
    KV cache of one sequence would take over KV_NOTE_BYTES."""
    model, meta, _ = load_model(spec, device, name, ema, block_size)
    cfg = model.config
    cache = 2 * cfg.n_layer * cfg.n_kv_head * cfg.head_dim * cfg.block_size * next(model.parameters()).element_size()
    if cache > KV_NOTE_BYTES:
        print(f"note: the KV cache takes {cache / 2**30:.1f} GiB per sequence at the model's block_size="
              f"{cfg.block_size}; --block_size={min(cfg.block_size // 4, 4096)} lowers it", file=sys.stderr)
    try:
        tokenizer = check_tokenizer(meta or {})
    except ValueError as e:
        die(f"{spec} carries no usable tokenizer ({e}); re-train with this version, or import the model with its "
            f"tokenizer (convert.py --src=FOLDER with its tokenizer.json)")
    tokenizer.meta = meta  # its chat template and stop ids, for chat.py
    return model, tokenizer


def resumed_config(record, config, explicit):
    """A resumed run continues as it was: every setting not given now comes from the checkpoint (out_dir never: a
    run writes only where it was started), and one given that would change the architecture or the data stops it."""
    if "optimizers" not in record:
        die(f"{record['path']} holds a model but no training state (convert.py or nanoGPT wrote it); warm-start "
            f"from it instead: --init_from={record['path']} --out_dir=NEW")
    keep = explicit | {"init_from", "device", "eval_only", "overwrite", "out_dir"}
    config = {k: record["config"][k] if k in record["config"] and k not in keep else v for k, v in config.items()}
    for key in sorted(explicit & (set(MODEL_FIELDS) | {"model_type", "dataset"}) - {"dropout"}):
        saved = record["config"][key] if key in ("model_type", "dataset") else record["model_config"][key]
        if config[key] is not None and config[key] != saved:
            die(f"--{key}={config[key]!r} differs from the checkpoint's {saved!r}; a resumed run keeps its "
                f"architecture and data: drop the setting or start a new --out_dir")
    return dict(config, init_from="resume")


def restore_training(record, model, optimizers, scaler, ema, rank, device_type, optimizer):
    """Put a resumed run's optimizer, grad-scaler, RNG and EMA states back (a sharded checkpoint's weights and
    optimizer state too, however this run is sharded; a whole checkpoint's into a sharded run, too)."""
    if record["optimizers"] == "sharded":
        load_sharded(record["path"], model, optimizers, ema if record.get("ema") == "sharded" else None)
    try:
        states = [] if record["optimizers"] == "sharded" else record["optimizers"]  # (sharded: loaded above)
        assert not states or len(optimizers) == len(states)
        if states and is_sharded(model):  # a whole ckpt.pt into parallel=fsdp
            load_whole_optimizers(model, optimizers, states)
        else:
            for opt, state in zip(optimizers, states, strict=False):
                opt.load_state_dict(state)
    except (AssertionError, ValueError, KeyError, RuntimeError):
        die(f"the optimizer state in {record['path']} does not fit optimizer={optimizer!r}; resume with the optimizer "
            f"the run was trained with ({record['config']['optimizer']!r}), or warm-start a new run: "
            f"--init_from={record['path']} --out_dir=NEW")
    scaler.load_state_dict(record["scaler"])
    restore_rng(record["rng"], rank, device_type)
    if ema is not None and record.get("ema") not in (None, "sharded"):  # a run that already kept one (sharded: above)
        load_whole(ema, record["ema"])
    elif ema is not None and not record.get("ema"):  # a new moving average starts at the resumed weights
        for average, p in zip(ema.module.parameters(), model.parameters(), strict=True):
            average.detach().copy_(p.detach())


# -----------------------------------------------------------------------------
# nanoGPT's checkpoints and vocabularies


class PlainUnpickler(pickle.Unpickler):
    """Reads only dicts, lists, tuples, strings and numbers: any class or function in the pickle is refused
    before it is looked up, so nothing in the file runs."""

    def find_class(self, module, name):
        raise pickle.UnpicklingError(f"it refers to {module}.{name}, and only plain data is read")


def read_vocab(path):
    """Our meta from a nanoGPT meta.pkl (stoi/itos, read without running code) or a meta.json."""
    if path.endswith(".json"):
        return read_json(path, "vocabulary (meta.json)", "give the meta.json of the checkpoint's dataset")
    try:
        with open(path, "rb") as f:
            data = PlainUnpickler(f).load()
        itos = data["itos"]
        return dict(tokenizer="char", vocab=[itos[i] for i in range(len(itos))], vocab_size=len(itos), dtype="uint16")
    except (pickle.UnpicklingError, EOFError, ValueError, KeyError, TypeError, UnicodeDecodeError, OSError) as e:
        die(f"{path} is not a usable vocabulary: {e}")


def from_nanogpt(ckpt, path, meta_path=""):
    """A nanoGPT checkpoint (model_args, weights maybe under _orig_mod.) in our terms; the vocabulary from
    meta_path, data/<its dataset>/meta.pkl or meta.pkl/meta.json beside it; GPT-2's when it has GPT-2's size."""
    args = ckpt["model_args"]
    cfg = GPTConfig(**{k: args[k] for k in ("n_layer", "n_head", "n_embd", "block_size", "bias", "vocab_size")})
    state = {k: v for k, v in strip_compiled(ckpt["model"]).items() if not k.endswith(IGNORED)}
    folder = os.path.dirname(os.path.abspath(path))
    dataset = (ckpt.get("config") or {}).get("dataset", "")
    places = ([meta_path] if meta_path else []) + [os.path.join("data", dataset, "meta.pkl")] * bool(dataset) + \
        [os.path.join(folder, name) for name in ("meta.pkl", "meta.json")]
    found = next((p for p in places if os.path.isfile(p)), None)
    if meta_path and found != meta_path:
        die(f"--meta={meta_path} not found")
    if found:
        vocab = read_vocab(found)
    elif cfg.vocab_size in (50257, 50304):  # nanoGPT's own rule: no meta.pkl means GPT-2's tokens
        vocab = dict(GPT2_META)
    else:
        die(f"no vocabulary for the nanoGPT checkpoint {path}: looked for {', '.join(places)}; pass "
            f"--meta=path/to/meta.pkl (nanoGPT's prepare.py writes it beside the dataset) to convert.py --src={path}")
    return dict(model_config=vars(cfg), model=state, meta=vocab)


def extends_vocab(old, new):
    """True when the vocabulary of `new` (a dataset's meta) keeps every token of `old` (a model's) at its id and
    adds more after them (prepare_char --vocab_from, chat tokens added to an older BPE)."""
    if not old or old.get("tokenizer") != new.get("tokenizer") or new["vocab_size"] <= old["vocab_size"]:
        return False
    if old["tokenizer"] == "char":
        return new["vocab"][:len(old["vocab"])] == old["vocab"]
    if old["tokenizer"] == "bpe" and "tokenizer_json" in old and "tokenizer_json" in new:
        ours, theirs = (Tokenizer.from_str(m["tokenizer_json"]).get_vocab() for m in (old, new))
        return all(theirs.get(token) == i for token, i in ours.items())
    return False


VOCAB_KEYS = ("tokenizer", "vocab_size", "vocab", "tokenizer_json")  # what makes two vocabularies the same


def vocab_fits(model_meta, data_meta, where, dataset):
    """Check that a model (a checkpoint's or a warm start's meta) reads a dataset's tokens; True when the dataset's
    vocabulary extends the model's (the embeddings grow), False when it is the same; one line and exit otherwise."""
    if not model_meta or all(model_meta.get(k) == data_meta.get(k) for k in VOCAB_KEYS):
        return False
    if where == "resume":
        die(f"data/{dataset} has a different vocabulary from the one the checkpoint was trained with; "
            f"re-prepare the same data or start a new --out_dir")
    if extends_vocab(model_meta, data_meta):
        return True
    die(f"--init_from={where} reads {describe_vocab(model_meta)} but data/{dataset} holds {describe_vocab(data_meta)}; "
        f"prepare the data with its tokenizer"
        + (" (python prepare_bpe.py --input=... --tokenizer=gpt2)" if model_meta["tokenizer"] == "gpt2" else ""))


def warm_start(source, overrides):
    """(GPTConfig, state dict) to start a run (or a shorter context) from `source`: its architecture with the given
    fields overridden (dropout, and block_size lowered as nanoGPT crops it; learned positions cannot grow; a larger
    vocab_size adds embedding rows, each the mean of the learned ones, for the tokens an extended vocabulary adds)."""
    fields = {k: v for k, v in source["model_config"].items() if k in MODEL_FIELDS}
    overrides = dict(overrides)
    if "model_type" in overrides:
        fields.update(PRESETS[overrides.pop("model_type")])
    fields.update(overrides)
    state = dict(source["model"])
    for key in ("transformer.wte.weight", "lm_head.weight"):
        if key in state and len(state[key]) < fields["vocab_size"]:
            rows = state[key]
            state[key] = torch.cat([rows, rows.mean(0, keepdim=True).expand(fields["vocab_size"] - len(rows), -1)])
    wpe = state.get("transformer.wpe.weight")
    if wpe is not None and fields["block_size"] != len(wpe):
        if fields["block_size"] > len(wpe):
            raise ValueError(f"block_size={fields['block_size']} is longer than the {len(wpe)} positions the "
                             f"starting model learned; use --block_size={len(wpe)} or less")
        state["transformer.wpe.weight"] = wpe[:fields["block_size"]]
    return GPTConfig(**fields), state


def load_weights(model, weights, strict, name):
    """Load a warm start's weights into model; with strict=False only those that fit. Returns the report line."""
    own = model.state_dict()
    fits = {k: v for k, v in weights.items() if k in own and own[k].shape == v.shape}
    missing, unexpected = [k for k in own if k not in fits], [k for k in weights if k not in fits]
    if (missing or unexpected) and strict:
        die(f"{name} does not match this model (missing or reshaped: {missing[:3]}, unexpected: {unexpected[:3]}); "
            f"use the same architecture, or --strict_init=False to load what fits")
    model.load_state_dict(fits, strict=False)
    return f"warm start from {name}: {len(fits)} tensors loaded; missing keys {missing}; unexpected keys {unexpected}"
