"""
A new run from another model's weights (train.py's warm starts, and a shorter context for the scripts that generate):
whether a dataset's vocabulary fits the model's, the source's config with this run's fields, embeddings grown for an
extended vocabulary, positions cropped, and the weights loaded strictly or as far as they fit. Not run by itself.
"""

import torch
from tokenizers import Tokenizer

from errors import die
from model import MODEL_FIELDS, PRESETS, GPTConfig
from tokenizer import describe_vocab


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
    fields = {k: v for k, v in source.model_config.items() if k in MODEL_FIELDS}
    overrides = dict(overrides)
    if "model_type" in overrides:
        fields.update(PRESETS[overrides.pop("model_type")])
    fields.update(overrides)
    state = dict(source.model)
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


def load_weights(model, weights, strict, name, device):
    """A warm start's weights for a model built on the meta device (see adopt), on device; with strict=False only
    those that fit (the rest drawn from scratch). Returns the report line."""
    own = model.state_dict()
    fits = {k: v for k, v in weights.items() if k in own and own[k].shape == v.shape}
    missing, unexpected = [k for k in own if k not in fits], [k for k in weights if k not in fits]
    if (missing or unexpected) and strict:
        die(f"{name} does not match this model (missing or reshaped: {missing[:3]}, unexpected: {unexpected[:3]}); "
            f"use the same architecture, or --strict_init=False to load what fits")
    adopt(model, fits, device)
    return f"warm start from {name}: {len(fits)} tensors loaded; missing keys {missing}; unexpected keys {unexpected}"


def adopt(model, weights, device, strict=False):
    """Weights for a model built on the meta device, on `device`: where they are all there, the tensors themselves
    (no second copy of a model: the model and the caller's dict share them, each tensor moved and cast once), else
    the model drawn from scratch and those given copied in (strict: a RuntimeError naming what does not match)."""
    own = model.state_dict()
    if own.keys() != weights.keys():
        model.to_empty(device=device)
        model.init_weights()
        model.load_state_dict(weights, strict=strict)
        return model
    moved, key = {}, lambda v: (v.data_ptr(), v.shape)  # by memory: a tied embedding and head move once
    for k, v in weights.items():
        if key(v) not in moved:
            moved[key(v)] = v.to(device=device, dtype=own[k].dtype)
    model.load_state_dict({k: moved[key(v)] for k, v in weights.items()}, assign=True)
    model.tie_and_tables()
    return model
