"""
nanoGPT's checkpoints and vocabularies in our terms: its model_args as our config, its weights without torch.compile's
prefix, its meta.pkl read without running any code in it. checkpoint.load_source reads them through here. Not run by
itself.
"""

import os
import pickle

from dataset import read_json
from errors import die
from hf import IGNORED
from hf_tokenizer import GPT2_META
from model import GPTConfig


def strip_compiled(state):
    """A state dict without torch.compile's `_orig_mod.` prefix."""
    return {k.removeprefix("_orig_mod."): v for k, v in state.items()}



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
    """(model_config, weights, meta) of a nanoGPT checkpoint (model_args, weights maybe under _orig_mod.); the
    vocabulary from meta_path, data/<its dataset>/meta.pkl or meta.pkl/meta.json beside it; GPT-2's when it has
    GPT-2's size."""
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
    return vars(cfg), state, vocab
