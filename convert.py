"""
Models in and out. Imports OpenAI's GPT-2 (from the Hugging Face hub), Hugging Face folders in the GPT-2,
Llama or Qwen3 layout, and nanoGPT checkpoints into a yoctoGPT run folder; exports a run to a folder that
transformers (and vLLM, llama.cpp's converter) load as it is. LAYOUTS' rows map our parameter names to
theirs, and both directions read them. train.py's init_from and sample.py/chat.py use the loaders here.

    python convert.py --src=gpt2 --out_dir=out-gpt2                         # OpenAI's GPT-2 (downloaded once)
    python convert.py --src=../nanoGPT/out-shakespeare-char --out_dir=out-nano  # a nanoGPT out_dir or ckpt.pt
    python convert.py --src=hf:path/to/folder --out_dir=out-llama             # a local Hugging Face folder
    python convert.py --out_dir=out-char-tiny --to=hf --dest=hf-char-tiny     # export for transformers
"""

import json
import os
import pickle

import torch

from common import load_checkpoint, resolve_checkpoint, save_checkpoint, write_vocab
from configurator import configure, die
from model import MODEL_FIELDS, PRESETS, GPTConfig

# -----------------------------------------------------------------------------
src = ""  # import from: gpt2 | gpt2-medium | gpt2-large | gpt2-xl | hf:FOLDER | a nanoGPT out_dir or ckpt.pt
out_dir = ""  # the yoctoGPT run folder: written by an import, read by an export
ckpt = ""  # export: the checkpoint in out_dir ('' = ckpt.pt, or best.pt if that is all there is)
to = "hf"  # export format: hf (a Hugging Face folder: config.json, model.safetensors, tokenizer)
dest = ""  # export: the folder to write
meta = ""  # import: a nanoGPT meta.pkl or a meta.json with the vocabulary, when none lies beside the checkpoint
overwrite = False  # replace an existing out_dir/ckpt.pt (import) or a non-empty dest (export)
# -----------------------------------------------------------------------------

HUB_MODELS = {name: f"openai-community/{name}" for name in ("gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl")}
GPT2_META = dict(tokenizer="gpt2", vocab_size=50257, dtype="uint16")
HF_ACTIVATIONS = {"gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "gelu": "gelu"}  # GPT-2's, ours
IGNORED = (".attn.bias", ".attn.masked_bias", ".rotary_emb.inv_freq")  # buffers (causal masks, RoPE), not weights
PIP_HF = "pip install safetensors huggingface_hub"


# -----------------------------------------------------------------------------
# the name/shape mapping, one row per tensor: (our name or None, their names, kind, sizes)
#   copy: the same tensor; conv1d: theirs is ours transposed (GPT-2's Conv1D); cat: ours is their tensors
#   stacked along dim 0 (sizes: their row counts); ones/zeros: we have no such tensor, theirs is that constant


def layout(cfg, arch):
    """The rows for a config in a Hugging Face architecture: gpt2, llama or qwen3."""
    hs, L, C = cfg.n_embd // cfg.n_head, cfg.n_layer, cfg.n_embd

    def param(ours, theirs, kind, present, size):  # a weight we may lack (bias=False, norm_affine=False)
        return (ours, [theirs], kind, None) if present else (None, [theirs], "zeros" if kind == "bias" else "ones", size)

    rows = []
    if arch == "gpt2":
        rows += [("transformer.wte.weight", ["transformer.wte.weight"], "copy", None),
                 ("transformer.wpe.weight", ["transformer.wpe.weight"], "copy", None)]
        norms = [f"transformer.h.{i}.{n}" for i in range(L) for n in ("ln_1", "ln_2")] + ["transformer.ln_f"]
        for n in norms:
            rows.append(param(n + ".weight", n + ".weight", "copy", cfg.norm_affine, (C,)))
            rows.append(param(n + ".bias", n + ".bias", "bias", cfg.norm_affine and cfg.bias, (C,)))
        widths = {"attn.c_attn": 3 * C, "attn.c_proj": C, "mlp.c_fc": cfg.mlp_hidden, "mlp.c_proj": C}
        for i in range(L):
            for lin, width in widths.items():
                name = f"transformer.h.{i}.{lin}"
                rows.append((name + ".weight", [name + ".weight"], "conv1d", None))
                rows.append(param(name + ".bias", name + ".bias", "bias", cfg.bias, (width,)))
    else:  # llama, qwen3
        rows.append(("transformer.wte.weight", ["model.embed_tokens.weight"], "copy", None))
        for i in range(L):
            ours, theirs = f"transformer.h.{i}.", f"model.layers.{i}."
            rows += [param(ours + "ln_1.weight", theirs + "input_layernorm.weight", "copy", cfg.norm_affine, (C,)),
                     (ours + "attn.c_attn.weight", [theirs + f"self_attn.{p}_proj.weight" for p in "qkv"], "cat",
                      [cfg.n_head * hs, cfg.n_kv_head * hs, cfg.n_kv_head * hs]),
                     (ours + "attn.c_proj.weight", [theirs + "self_attn.o_proj.weight"], "copy", None),
                     param(ours + "ln_2.weight", theirs + "post_attention_layernorm.weight", "copy", cfg.norm_affine, (C,)),
                     (ours + "mlp.c_fc.weight", [theirs + "mlp.gate_proj.weight", theirs + "mlp.up_proj.weight"], "cat",
                      [cfg.mlp_hidden, cfg.mlp_hidden]),
                     (ours + "mlp.c_proj.weight", [theirs + "mlp.down_proj.weight"], "copy", None)]
            if arch == "qwen3":  # our QK-norm has no learned scale: theirs is all ones
                rows += [(None, [theirs + f"self_attn.{p}_norm.weight"], "ones", (hs,)) for p in "qk"]
        rows.append(param("transformer.ln_f.weight", "model.norm.weight", "copy", cfg.norm_affine, (C,)))
    if not cfg.tie_weights:
        rows.append(("lm_head.weight", ["lm_head.weight"], "copy", None))
    return rows


def to_hf(cfg, state, arch):
    """Our state dict -> theirs (contiguous tensors that share no memory, as safetensors needs)."""
    out = {}
    for ours, theirs, kind, sizes in layout(cfg, arch):
        if kind in ("ones", "zeros"):
            out[theirs[0]] = getattr(torch, kind)(sizes)
        elif kind == "cat":
            out.update(zip(theirs, state[ours].split(sizes, dim=0), strict=True))
        else:
            out[theirs[0]] = state[ours].t() if kind == "conv1d" else state[ours]
    return {k: v.detach().float().contiguous().clone() for k, v in out.items()}


def from_hf(cfg, tensors, arch, where):
    """Their state dict -> ours; stops with one line on a missing or unexpected tensor, or a learned
    value we cannot represent (a qk-norm scale that is not 1, say)."""
    prefix = "transformer." if arch == "gpt2" else "model."  # some checkpoints leave the base prefix out
    theirs = {(k if k.startswith(prefix) or k == "lm_head.weight" else prefix + k): v for k, v in tensors.items()
              if not k.endswith(IGNORED)}
    state = {}
    for ours, names, kind, sizes in layout(cfg, arch):
        missing = [n for n in names if n not in theirs]
        if missing:
            die(f"{where} has no tensor {missing[0]}; is it a {arch} model of the shape config.json describes?")
        tensors_ = [theirs.pop(n).float() for n in names]
        if kind in ("ones", "zeros"):
            if not torch.equal(tensors_[0], getattr(torch, kind)(sizes)):
                die(f"{where}: {names[0]} is not all {kind[:-1]}s, which yoctoGPT's {arch} equivalent cannot represent")
        else:
            state[ours] = tensors_[0].t() if kind == "conv1d" else torch.cat(tensors_, dim=0)
    theirs.pop("lm_head.weight", None)  # a tied head saved anyway
    if theirs:
        die(f"{where} has tensors yoctoGPT does not know ({', '.join(list(theirs)[:3])}); it is not a plain {arch} model")
    if cfg.tie_weights:
        state["lm_head.weight"] = state["transformer.wte.weight"]
    return state


def hf_arch(cfg):
    """The Hugging Face architecture a config exports to, or one line naming the field that has none."""
    for field, off in (("ngram_emb", 0), ("logit_softcap", 0.0)):
        if getattr(cfg, field) != off:
            die(f"{field}={getattr(cfg, field)!r} has no Hugging Face equivalent; only models without it export")
    want = dict(mlp=("gelu", "gelu_tanh"), norm="layernorm", n_kv_head=cfg.n_head, qk_norm=False) \
        if cfg.pos_emb == "learned" else dict(mlp=("swiglu",), norm="rmsnorm", bias=False)
    arch = "gpt2" if cfg.pos_emb == "learned" else "qwen3" if cfg.qk_norm else "llama"
    for field, ok in want.items():
        value = getattr(cfg, field)
        if value not in (ok if isinstance(ok, tuple) else (ok,)):
            die(f"{field}={value!r} has no Hugging Face equivalent with pos_emb={cfg.pos_emb!r} ({arch} needs "
                f"{field}={ok!r}); export supports the gpt and gpt_plus presets")
    return arch


def hf_config(cfg, arch, meta):
    """config.json for our config."""
    tok = token_ids(meta)
    common = dict(architectures=[{"gpt2": "GPT2LMHeadModel", "llama": "LlamaForCausalLM", "qwen3": "Qwen3ForCausalLM"}[arch]],
                  model_type=arch, vocab_size=cfg.vocab_size, tie_word_embeddings=cfg.tie_weights,
                  bos_token_id=tok["bos"], eos_token_id=tok["eos"], torch_dtype="float32", dtype="float32")
    if arch == "gpt2":
        return dict(common, n_positions=cfg.block_size, n_ctx=cfg.block_size, n_embd=cfg.n_embd, n_layer=cfg.n_layer,
                    n_head=cfg.n_head, n_inner=cfg.mlp_hidden, layer_norm_epsilon=cfg.norm_eps or 1e-5,
                    activation_function="gelu_new" if cfg.mlp == "gelu_tanh" else "gelu",
                    resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    rope = dict(rope_type="default", rope_theta=cfg.rope_theta)
    return dict(common, hidden_size=cfg.n_embd, intermediate_size=cfg.mlp_hidden, num_hidden_layers=cfg.n_layer,
                num_attention_heads=cfg.n_head, num_key_value_heads=cfg.n_kv_head, head_dim=cfg.n_embd // cfg.n_head,
                max_position_embeddings=cfg.block_size, rms_norm_eps=cfg.norm_eps or torch.finfo(torch.float32).eps,
                rope_theta=cfg.rope_theta, rope_parameters=rope, hidden_act="silu", attention_bias=False,
                mlp_bias=False, attention_dropout=0.0, use_sliding_window=False, sliding_window=None)


def config_from_hf(hf, where):
    """Our config fields for a Hugging Face config.json; one line for what we cannot represent."""
    arch = hf.get("model_type")
    if arch == "gpt2":
        act = hf.get("activation_function", "gelu_new")
        if act not in HF_ACTIVATIONS or hf.get("scale_attn_by_inverse_layer_idx") or hf.get("add_cross_attention"):
            die(f"{where}: a GPT-2 variant yoctoGPT has no equivalent for (activation_function={act!r}, "
                f"scale_attn_by_inverse_layer_idx, add_cross_attention)")
        return arch, dict(vocab_size=hf["vocab_size"], block_size=hf["n_positions"], n_layer=hf["n_layer"], n_head=hf["n_head"],
                          n_embd=hf["n_embd"], mlp_hidden=hf.get("n_inner") or 4 * hf["n_embd"], mlp=HF_ACTIVATIONS[act],
                          bias=True, tie_weights=hf.get("tie_word_embeddings", True), pos_emb="learned", norm="layernorm",
                          norm_eps=hf.get("layer_norm_epsilon", 1e-5))
    if arch in ("llama", "qwen3"):
        rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
        heads, width = hf["num_attention_heads"], hf["hidden_size"]
        unsupported = [k for k, bad in (("attention_bias", hf.get("attention_bias")), ("mlp_bias", hf.get("mlp_bias")),
                                        ("hidden_act", hf.get("hidden_act", "silu") != "silu"),
                                        ("head_dim", hf.get("head_dim", width // heads) != width // heads),
                                        ("rope_scaling", rope.get("rope_type", rope.get("type", "default")) != "default"),
                                        ("use_sliding_window", hf.get("use_sliding_window"))) if bad]
        if unsupported:
            die(f"{where}: {unsupported[0]}={hf.get(unsupported[0], rope)!r} has no yoctoGPT equivalent")
        return arch, dict(vocab_size=hf["vocab_size"], block_size=hf["max_position_embeddings"], n_layer=hf["num_hidden_layers"],
                          n_head=heads, n_kv_head=hf.get("num_key_value_heads") or heads, n_embd=width,
                          mlp_hidden=hf["intermediate_size"], mlp="swiglu", bias=False,
                          tie_weights=hf.get("tie_word_embeddings", arch == "qwen3"), pos_emb="rope", norm="rmsnorm",
                          norm_eps=hf.get("rms_norm_eps", 1e-6), qk_norm=arch == "qwen3",
                          rope_theta=float(rope.get("rope_theta") or hf.get("rope_theta", 10000.0)))
    die(f"{where}: model_type={arch!r} is not one yoctoGPT imports (gpt2, llama, qwen3)")


# -----------------------------------------------------------------------------
# tokenizers


def token_ids(meta):
    """BOS and EOS ids of a checkpoint's tokenizer (None where it has none)."""
    kind = (meta or {}).get("tokenizer")
    if kind == "gpt2":
        return dict(bos=50256, eos=50256)
    if kind == "bpe":
        from tokenizer import load_tokenizer
        tok = load_tokenizer(meta)
        return dict(bos=tok.bos_id, eos=tok.eos_id)
    return dict(bos=None, eos=None)


def char_tokenizer(chars):
    """A tokenizers.Tokenizer with one token per character, ids as in our vocabulary."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    tok = Tokenizer(models.WordLevel({c: i for i, c in enumerate(chars)}, unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")  # every character alone
    tok.decoder = decoders.Fuse()  # and joined back without spaces
    return tok


def bytes_to_unicode():
    """GPT-2's printable stand-in character for each byte (byte-level BPE vocabularies are written in them)."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    moved = [b for b in range(256) if b not in keep]
    return {**{b: chr(b) for b in keep}, **{b: chr(256 + n) for n, b in enumerate(moved)}}


def tiktoken_tokenizer(enc):
    """tiktoken's byte-level BPE (GPT-2's) as a tokenizers.Tokenizer: the vocabulary in GPT-2's characters and
    each token's merge recovered by running BPE on its bytes with the lower ranks only."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
    ranks, char = enc._mergeable_ranks, bytes_to_unicode()
    text = lambda b: "".join(char[x] for x in b)  # noqa: E731
    merges = []
    for token, rank in sorted(ranks.items(), key=lambda kv: kv[1]):
        parts = [bytes([b]) for b in token]
        while len(parts) > 2:  # merge the lowest-ranked adjacent pair until two parts are left
            i = min(range(len(parts) - 1), key=lambda j: ranks.get(parts[j] + parts[j + 1], rank))
            parts[i:i + 2] = [parts[i] + parts[i + 1]]
        if len(parts) == 2:
            merges.append((text(parts[0]), text(parts[1])))
    tok = Tokenizer(models.BPE({text(t): r for t, r in ranks.items()}, merges))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(s, special=True) for s in sorted(enc._special_tokens, key=enc._special_tokens.get)])
    return tok


def export_tokenizer(meta, dest, block_size):
    """tokenizer.json and tokenizer_config.json in dest, so AutoTokenizer encodes text to our ids."""
    from tokenizer import BOS, EOS, gpt2_encoding
    kind, specials = meta.get("tokenizer"), {}
    if kind == "char":
        tok = char_tokenizer(meta["vocab"])
    elif kind == "bpe":
        from tokenizers import Tokenizer
        tok = Tokenizer.from_str(meta["tokenizer_json"])
        specials = {f"{k}_token": meta.get(f"{k}_token", name) for k, name in (("bos", BOS), ("eos", EOS))}
    else:
        tok = tiktoken_tokenizer(gpt2_encoding())
        specials = dict(bos_token="<|endoftext|>", eos_token="<|endoftext|>", unk_token="<|endoftext|>")
    tok.save(os.path.join(dest, "tokenizer.json"))
    specials = {k: v for k, v in specials.items() if tok.token_to_id(v) is not None}
    if meta.get("chat_template"):  # a fine-tuned chat model: apply_chat_template renders as chat.py does
        from sft import jinja
        specials["chat_template"] = jinja(meta["chat_template"])
    with open(os.path.join(dest, "tokenizer_config.json"), "w", encoding="utf-8") as f:
        json.dump(dict(tokenizer_class="PreTrainedTokenizerFast", clean_up_tokenization_spaces=False,
                       model_max_length=block_size, add_bos_token=False, **specials), f, indent=1)


def meta_from_hf(folder, arch, vocab_size):
    """Our meta (the tokenizer) for a Hugging Face folder, or None when it has no tokenizer.json."""
    path = os.path.join(folder, "tokenizer.json")
    if not os.path.isfile(path):
        return dict(GPT2_META) if arch == "gpt2" and vocab_size == 50257 else None
    with open(path, encoding="utf-8") as f:
        text = f.read()  # kept verbatim: warm starts compare it with a dataset's tokenizer.json
    try:
        spec = json.loads(text)
    except ValueError as e:
        die(f"{path} is not a readable tokenizer.json ({type(e).__name__}: {e})")
    if not isinstance(spec, dict) or not isinstance(spec.get("model"), dict):
        die(f"{path} is not a Hugging Face tokenizer.json")
    vocab = spec["model"].get("vocab", {})
    if spec["model"]["type"] == "WordLevel" and all(len(c) == 1 for c in vocab):  # one token per character
        return dict(tokenizer="char", vocab=sorted(vocab, key=vocab.get), vocab_size=len(vocab), dtype="uint16")
    if len(vocab) == 50257 - 1 and arch == "gpt2":  # GPT-2's own BPE: use tiktoken's, as our gpt2 datasets do
        return dict(GPT2_META)
    settings = {}
    if os.path.isfile(os.path.join(folder, "tokenizer_config.json")):
        settings = read_json(os.path.join(folder, "tokenizer_config.json"), "tokenizer_config.json")
    names = {k: v.get("content") if isinstance(v, dict) else v for k in ("bos_token", "eos_token") if (v := settings.get(k))}
    size = len(vocab) + len(spec.get("added_tokens", []))
    return dict(tokenizer="bpe", tokenizer_json=text, vocab_size=size, dtype="uint16" if size < 65536 else "uint32", **names)


# -----------------------------------------------------------------------------
# sources: anything init_from, convert.py --src, sample.py and chat.py can start from, as
# dict(model_config=..., model=state dict in our names, meta=tokenizer or None)


def hub_folder(name):
    """The local folder of OpenAI's GPT-2 weights, downloaded once into the Hugging Face cache."""
    try:
        from huggingface_hub import hf_hub_download
        from huggingface_hub.utils import logging
    except ImportError:
        die(f"loading {name} needs huggingface_hub and safetensors: {PIP_HF}")
    logging.set_verbosity_error()  # its retry warnings; a failure is reported below in one line
    try:
        hf_hub_download(HUB_MODELS[name], "config.json")
        return os.path.dirname(hf_hub_download(HUB_MODELS[name], "model.safetensors"))
    except Exception as e:  # offline, no cache, a proxy...: one line
        first = (str(e).strip().splitlines() or [""])[0].split(". ")[0][:160]
        die(f"could not get {name}'s weights from the Hugging Face hub ({type(e).__name__}: {first}); go online once "
            f"(they are cached under HF_HOME), or download the folder elsewhere and pass hf:FOLDER")


def read_hf_weights(folder):
    """Every tensor of a Hugging Face folder: model.safetensors (or its shards), else pytorch_model.bin."""
    index = os.path.join(folder, "model.safetensors.index.json")
    files = [os.path.join(folder, "model.safetensors")]
    if os.path.isfile(index):
        with open(index, encoding="utf-8") as f:
            files = sorted({os.path.join(folder, v) for v in json.load(f)["weight_map"].values()})
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


def read_json(path, what):
    """A JSON file's contents, or one line saying it is not usable."""
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError) as e:
        die(f"{path} is not a readable {what} ({type(e).__name__}: {e})")


def from_hf_folder(folder):
    path = os.path.join(folder, "config.json")
    if not os.path.isfile(path):
        die(f"{folder} is not a Hugging Face model folder (no config.json)")
    hf = read_json(path, "config.json")
    try:
        arch, fields = config_from_hf(hf, folder)
        cfg = GPTConfig(**fields)
    except (KeyError, TypeError, AttributeError, ValueError) as e:  # a field missing or of the wrong kind
        die(f"{path} is not a usable model config.json ({type(e).__name__}: {e})")
    state = from_hf(cfg, read_hf_weights(folder), arch, folder)
    return dict(model_config=vars(cfg), model=state, meta=meta_from_hf(folder, arch, cfg.vocab_size))


class PlainUnpickler(pickle.Unpickler):
    """Reads only dicts, lists, tuples, strings and numbers: any class or function in the pickle is refused
    before it is looked up, so nothing in the file runs."""

    def find_class(self, module, name):
        raise pickle.UnpicklingError(f"it refers to {module}.{name}, and only plain data is read")


def read_vocab(path):
    """Our meta from a nanoGPT meta.pkl (stoi/itos, read without running code) or a meta.json."""
    try:
        if path.endswith(".json"):
            with open(path, encoding="utf-8") as f:
                return json.load(f)
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
    state = {k.removeprefix("_orig_mod."): v for k, v in ckpt["model"].items()}
    state = {k: v for k, v in state.items() if not k.endswith(IGNORED)}
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


def load_source(spec, meta_path=""):
    """The model `spec` names: gpt2* (the hub), hf:FOLDER or a Hugging Face folder, a run folder or a
    checkpoint file (ours or nanoGPT's)."""
    if spec in HUB_MODELS:
        source = from_hf_folder(hub_folder(spec))
        return dict(source, meta=dict(GPT2_META))
    if spec.startswith("hf:") or os.path.isfile(os.path.join(spec, "config.json")):
        return from_hf_folder(spec.removeprefix("hf:"))
    path = resolve_checkpoint(spec) if os.path.isdir(spec) else spec
    ckpt = load_checkpoint(path)
    if "model_args" in ckpt:
        return from_nanogpt(ckpt, path, meta_path)
    if "model_config" not in ckpt or "model" not in ckpt:
        die(f"{path} is neither a yoctoGPT nor a nanoGPT checkpoint (it has no model_config or model_args)")
    state = {k.removeprefix("_orig_mod."): v for k, v in ckpt["model"].items()}
    return dict(model_config=ckpt["model_config"], model=state, meta=ckpt.get("meta"))


def extends_vocab(old, new):
    """True when the vocabulary of `new` (a dataset's meta) keeps every token of `old` (a model's) at its id and
    adds more after them (prepare_char --vocab_from, chat tokens added to an older BPE)."""
    if not old or old.get("tokenizer") != new.get("tokenizer") or new["vocab_size"] <= old["vocab_size"]:
        return False
    if old["tokenizer"] == "char":
        return new["vocab"][:len(old["vocab"])] == old["vocab"]
    if old["tokenizer"] == "bpe" and "tokenizer_json" in old and "tokenizer_json" in new:
        from tokenizers import Tokenizer
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
    """(GPTConfig, state dict) to start a run from `source`: its architecture with the given fields overridden
    (dropout, and block_size lowered as nanoGPT crops it; learned positions cannot grow; a larger vocab_size adds
    embedding rows, each the mean of the learned ones, for the tokens an extended vocabulary adds)."""
    fields = {k: v for k, v in source["model_config"].items() if k in MODEL_FIELDS}
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


def describe_vocab(meta):
    if not meta:
        return "an unknown tokenizer"
    known = {"char": f"{meta['vocab_size']} characters", "gpt2": "GPT-2's tokens"}
    return known.get(meta["tokenizer"], f"a {meta['vocab_size']}-token {'word-level vocabulary' if meta.get('word_level') else 'BPE'}")


# -----------------------------------------------------------------------------


def import_run(source):
    """Write out_dir/ckpt.pt (and meta.json, tokenizer.json) for a source, so every script takes it as a run."""
    cfg = GPTConfig(**{k: v for k, v in source["model_config"].items() if k in MODEL_FIELDS})
    record = dict(model=source["model"], model_config=vars(cfg), meta=source["meta"], config=dict(out_dir=out_dir),
                  iter_num=0, best_val_loss=float("inf"), train_time=0.0, converted_from=src)
    os.makedirs(out_dir, exist_ok=True)
    save_checkpoint(record, os.path.join(out_dir, "ckpt.pt"))
    if source["meta"]:
        write_vocab(out_dir, source["meta"])
    else:
        print("note: the source has no tokenizer; it trains (init_from) but sample.py and chat.py need one")
    print(f"wrote {out_dir}/ckpt.pt: {cfg.describe()}, {describe_vocab(source['meta'])}")


def export_hf(record):
    """Write dest: config.json, model.safetensors, generation_config.json, tokenizer files."""
    cfg = GPTConfig(**{k: v for k, v in record["model_config"].items() if k in MODEL_FIELDS})
    arch = hf_arch(cfg)
    try:
        from safetensors.torch import save_file
    except ImportError:
        die(f"export writes model.safetensors, which needs safetensors: {PIP_HF}")
    tensors = to_hf(cfg, {k.removeprefix("_orig_mod."): v for k, v in record["model"].items()}, arch)
    meta_ = record.get("meta") or {}
    os.makedirs(dest, exist_ok=True)
    config = hf_config(cfg, arch, meta_)
    with open(os.path.join(dest, "config.json"), "w", encoding="utf-8") as f:
        json.dump(config, f, indent=1)
    with open(os.path.join(dest, "generation_config.json"), "w", encoding="utf-8") as f:
        json.dump(dict(bos_token_id=config["bos_token_id"], eos_token_id=config["eos_token_id"]), f, indent=1)
    save_file(tensors, os.path.join(dest, "model.safetensors"), metadata={"format": "pt"})
    if meta_:
        export_tokenizer(meta_, dest, cfg.block_size)
    print(f"wrote {dest}: {config['architectures'][0]} ({cfg.describe()}), {describe_vocab(meta_)}")


if __name__ == "__main__":
    configure(globals())
    if not out_dir:
        die("--out_dir is required: the run folder to write (with --src) or to export (with --dest)")
    if src:
        if os.path.isfile(os.path.join(out_dir, "ckpt.pt")) and not overwrite:
            die(f"{out_dir}/ckpt.pt already exists; pick another --out_dir or pass --overwrite=True")
        import_run(load_source(src, meta))
    elif dest:
        if to != "hf":
            die(f"--to={to!r}: the export format is hf (a Hugging Face folder)")
        if os.path.isdir(dest) and os.listdir(dest) and not overwrite:
            die(f"{dest} is not empty; pick another --dest or pass --overwrite=True")
        path = resolve_checkpoint(out_dir, ckpt)
        export_hf(load_source(path))
    else:
        die("nothing to do: --src=SOURCE imports into --out_dir; --to=hf --dest=FOLDER exports --out_dir")
