"""
Hugging Face interop: our parameter names mapped to theirs (GPT-2, Llama and Qwen3 layouts) in both directions,
config.json and tokenizer files both ways, and the hub download of OpenAI's GPT-2. LAYOUTS' rows map our names to
theirs, and both directions read them. Not run by itself.
"""

import json
import os
import re

import torch
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers

from chat_templates import jinja
from dataset import atomic_write, make_out_dir, read_json, token_dtype, write_json
from errors import die
from model import GPTConfig, config_from_dict
from tokenizer import BOS, EOS, check_tokenizer, describe_vocab, gpt2_encoding, load_tokenizer

HUB_MODELS = {name: f"openai-community/{name}" for name in ("gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl")}
GPT2_META = dict(tokenizer="gpt2", vocab_size=50257, dtype="uint16")
HF_ACTIVATIONS = {"gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "gelu": "gelu"}  # GPT-2's, ours
IGNORED = (".attn.bias", ".attn.masked_bias", ".rotary_emb.inv_freq")  # buffers (causal masks, RoPE), not weights
PIP_HF = "pip install safetensors huggingface_hub"
HUB_FILES = ["*.json", "*.safetensors", "*.jinja"]  # what a download fetches: config, weights, tokenizer, template


# the name/shape mapping, one row per tensor: (our name or None, their names, kind, sizes)
#   copy: the same tensor; conv1d: theirs is ours transposed (GPT-2's Conv1D); cat: ours is their tensors
#   stacked along dim 0 (sizes: their row counts); ones/zeros: we have no such tensor, theirs is that constant


def layout(cfg, arch):
    """The rows for a config in a Hugging Face architecture: gpt2, llama or qwen3."""
    hs, L, C = cfg.head_dim, cfg.n_layer, cfg.n_embd

    def param(ours, theirs, kind, present, size):  # a weight we may lack (bias=False, norm_affine=False)
        if present:
            return ours, [theirs], kind, None
        return None, [theirs], "zeros" if kind == "bias" else "ones", size

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
                     param(ours + "ln_2.weight", theirs + "post_attention_layernorm.weight", "copy", cfg.norm_affine,
                           (C,)),
                     (ours + "mlp.c_fc.weight", [theirs + "mlp.gate_proj.weight", theirs + "mlp.up_proj.weight"], "cat",
                      [cfg.mlp_hidden, cfg.mlp_hidden]),
                     (ours + "mlp.c_proj.weight", [theirs + "mlp.down_proj.weight"], "copy", None)]
            if arch == "qwen3":  # without qk_norm_scale ours has no learned scale: theirs is all ones
                rows += [param(ours + f"attn.{p}_norm.weight", theirs + f"self_attn.{p}_norm.weight", "copy",
                               cfg.qk_norm_scale, (hs,)) for p in "qk"]
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
        die(f"{where} has tensors yoctoGPT does not know ({', '.join(list(theirs)[:3])}); it is not a plain {arch} "
            f"model")
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
    name = {"gpt2": "GPT2LMHeadModel", "llama": "LlamaForCausalLM", "qwen3": "Qwen3ForCausalLM"}[arch]
    common = dict(architectures=[name],
                  model_type=arch, vocab_size=cfg.vocab_size, tie_word_embeddings=cfg.tie_weights,
                  bos_token_id=tok["bos"], eos_token_id=tok["eos"], torch_dtype="float32", dtype="float32")
    if arch == "gpt2":
        return dict(common, n_positions=cfg.block_size, n_ctx=cfg.block_size, n_embd=cfg.n_embd, n_layer=cfg.n_layer,
                    n_head=cfg.n_head, n_inner=cfg.mlp_hidden, layer_norm_epsilon=cfg.norm_eps or 1e-5,
                    activation_function="gelu_new" if cfg.mlp == "gelu_tanh" else "gelu",
                    resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    rope = dict(rope_type="default", rope_theta=cfg.rope_theta)
    return dict(common, hidden_size=cfg.n_embd, intermediate_size=cfg.mlp_hidden, num_hidden_layers=cfg.n_layer,
                num_attention_heads=cfg.n_head, num_key_value_heads=cfg.n_kv_head, head_dim=cfg.head_dim,
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
        return arch, dict(vocab_size=hf["vocab_size"], block_size=hf["n_positions"], n_layer=hf["n_layer"],
                          n_head=hf["n_head"], n_embd=hf["n_embd"], mlp_hidden=hf.get("n_inner") or 4 * hf["n_embd"],
                          mlp=HF_ACTIVATIONS[act], bias=True, tie_weights=hf.get("tie_word_embeddings", True),
                          pos_emb="learned", norm="layernorm", norm_eps=hf.get("layer_norm_epsilon", 1e-5))
    if arch in ("llama", "qwen3"):
        rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
        heads, width = hf["num_attention_heads"], hf["hidden_size"]
        checks = (("attention_bias", hf.get("attention_bias")), ("mlp_bias", hf.get("mlp_bias")),
                  ("hidden_act", hf.get("hidden_act", "silu") != "silu"),
                  ("rope_scaling", rope.get("rope_type", rope.get("type", "default")) != "default"),
                  ("use_sliding_window", hf.get("use_sliding_window")))
        unsupported = [k for k, bad in checks if bad]
        if unsupported:
            die(f"{where}: {unsupported[0]}={hf.get(unsupported[0], rope)!r} has no yoctoGPT equivalent")
        return arch, dict(vocab_size=hf["vocab_size"], block_size=hf["max_position_embeddings"],
                          n_layer=hf["num_hidden_layers"], n_head=heads,
                          n_kv_head=hf.get("num_key_value_heads") or heads, n_embd=width,
                          mlp_hidden=hf["intermediate_size"], mlp="swiglu", bias=False,
                          tie_weights=hf.get("tie_word_embeddings", arch == "qwen3"), pos_emb="rope", norm="rmsnorm",
                          norm_eps=hf.get("rms_norm_eps", 1e-6), qk_norm=arch == "qwen3",
                          qk_norm_scale=arch == "qwen3", head_dim=hf.get("head_dim") or width // heads,
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
        tok = load_tokenizer(meta)
        return dict(bos=tok.bos_id, eos=tok.eos_id)
    return dict(bos=None, eos=None)


def char_tokenizer(chars):
    """A tokenizers.Tokenizer with one token per character, ids as in our vocabulary."""
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
    ranks, char = enc._mergeable_ranks, bytes_to_unicode()
    text = lambda b: "".join(char[x] for x in b)
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
    specials = sorted(enc._special_tokens, key=enc._special_tokens.get)
    tok.add_special_tokens([AddedToken(s, special=True) for s in specials])
    return tok


def export_tokenizer(meta, dest, block_size):
    """tokenizer.json and tokenizer_config.json in dest, so AutoTokenizer encodes text to our ids."""
    kind, specials = meta.get("tokenizer"), {}
    if kind == "char":
        tok = char_tokenizer(meta["vocab"])
    elif kind == "bpe":
        tok = Tokenizer.from_str(meta["tokenizer_json"])
        specials = {f"{k}_token": meta.get(f"{k}_token", name) for k, name in (("bos", BOS), ("eos", EOS))}
    else:
        tok = tiktoken_tokenizer(gpt2_encoding())
        specials = dict(bos_token="<|endoftext|>", eos_token="<|endoftext|>", unk_token="<|endoftext|>")
    atomic_write(os.path.join(dest, "tokenizer.json"), lambda f: f.write(tok.to_str(pretty=True)))
    specials = {k: v for k, v in specials.items() if tok.token_to_id(v) is not None}
    specials.update(meta.get("special_tokens", {}))  # an imported model's own names, as its template uses them
    if meta.get("chat_template"):  # a chat model: apply_chat_template renders as chat.py does
        template = meta["chat_template"]
        specials["chat_template"] = jinja(template) if isinstance(template, dict) else template
    write_json(os.path.join(dest, "tokenizer_config.json"),
               dict(tokenizer_class="PreTrainedTokenizerFast", clean_up_tokenization_spaces=False,
                    model_max_length=block_size, add_bos_token=False, **specials))


def meta_from_hf(folder, arch, vocab_size):
    """Our meta (the tokenizer) for a Hugging Face folder, or None when it has no tokenizer.json; one line when its
    tokenizer.json cannot encode and decode text (checked here, not first at sampling time)."""
    path = os.path.join(folder, "tokenizer.json")
    if not os.path.isfile(path):
        return dict(GPT2_META) if arch == "gpt2" and vocab_size == 50257 else None
    with open(path, encoding="utf-8") as f:
        text = f.read()  # kept verbatim: warm starts compare it with a dataset's tokenizer.json
    try:
        spec = json.loads(text)
        vocab = spec["model"].get("vocab") or {}
        if spec["model"]["type"] == "WordLevel" and vocab and all(len(c) == 1 for c in vocab):  # a character each
            meta = dict(tokenizer="char", vocab=sorted(vocab, key=vocab.get), vocab_size=len(vocab), dtype="uint16")
        elif len(vocab) == 50257 - 1 and arch == "gpt2":  # GPT-2's own BPE: tiktoken's, as our gpt2 datasets use
            return dict(GPT2_META)
        else:
            config = os.path.join(folder, "tokenizer_config.json")
            settings = read_json(config, "tokenizer_config.json") if os.path.isfile(config) else {}
            names = {k: v.get("content") if isinstance(v, dict) else v
                     for k in ("bos_token", "eos_token") if (v := settings.get(k))}
            meta = dict(tokenizer="bpe", tokenizer_json=text, **names)
        tok = check_tokenizer(meta)
        meta.update(vocab_size=tok.vocab_size, dtype=token_dtype(tok.vocab_size), **chat_template_meta(folder, tok))
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        die(f"{path} is not a usable Hugging Face tokenizer.json ({type(e).__name__}: {str(e)[:160]}); "
            f"replace it with the model's own tokenizer.json")
    return meta


def tokenizer_meta(folder):
    """The meta of a Hugging Face folder's tokenizer alone (prepare_bpe.py --tokenizer=hf:...)."""
    config = os.path.join(folder, "config.json")
    arch = read_json(config, "config.json").get("model_type") if os.path.isfile(config) else None
    meta = meta_from_hf(folder, arch, 0)
    if meta is None:
        die(f"{folder} has no tokenizer.json; give a model folder (or hub id) that has one")
    return meta


def chat_template_meta(folder, tok):
    """A Hugging Face folder's chat template (tokenizer_config.json's chat_template, chat_template.jinja or
    chat_template.json), the special tokens it may name and the ids that end a turn (its eos_token and
    generation_config.json's eos_token_id); {} when it has none."""
    config = os.path.join(folder, "tokenizer_config.json")
    settings = read_json(config, "tokenizer_config.json") if os.path.isfile(config) else {}
    template = settings.get("chat_template")
    if isinstance(template, list):  # named templates: the default one
        template = next((t["template"] for t in template if t.get("name") == "default"), None)
    if not template and os.path.isfile(os.path.join(folder, "chat_template.jinja")):
        with open(os.path.join(folder, "chat_template.jinja"), encoding="utf-8") as f:
            template = f.read()
    if not template and os.path.isfile(os.path.join(folder, "chat_template.json")):
        template = read_json(os.path.join(folder, "chat_template.json"), "chat_template.json").get("chat_template")
    if not template:
        return {}
    specials = {k: v.get("content") if isinstance(v, dict) else v
                for k in ("bos_token", "eos_token", "unk_token", "pad_token")
                if isinstance(v := settings.get(k), (str, dict))}
    generation = os.path.join(folder, "generation_config.json")
    eos = read_json(generation, "generation_config.json").get("eos_token_id") if os.path.isfile(generation) else None
    to_id = tok.tok.token_to_id if hasattr(tok, "tok") else tok.stoi.get
    stops = ([eos] if isinstance(eos, int) else list(eos or [])) + [to_id(specials.get("eos_token") or "")]
    return dict(chat_template=template, special_tokens=specials, stop_ids=sorted({i for i in stops if i is not None}))


def hub_folder(spec):
    """The local folder of a hf: source: hf:FOLDER as it is, or hf:ORG/NAME[@REVISION] (and gpt2*, OpenAI's GPT-2)
    downloaded once from the Hugging Face hub into its cache (HF_HOME; HF_HUB_OFFLINE=1 reads the cache only):
    config, safetensors, tokenizer and chat template files only."""
    name = spec.removeprefix("hf:")
    if os.path.isdir(name):
        return name
    repo, _, revision = HUB_MODELS.get(name, name).partition("@")
    if not re.fullmatch(r"[\w.-]+/[\w.-]+", repo):
        die(f"{spec} is neither a folder here nor a Hugging Face hub id (hf:ORG/NAME or hf:ORG/NAME@REVISION)")
    try:
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError, RevisionNotFoundError
        from huggingface_hub.utils import logging
    except ImportError:
        die(f"loading {name} from the Hugging Face hub needs huggingface_hub and safetensors: {PIP_HF}")
    logging.set_verbosity_error()  # its retry warnings; a failure is reported below in one line
    try:
        return snapshot_download(repo, revision=revision or None, allow_patterns=HUB_FILES)
    except GatedRepoError:
        die(f"{repo} is gated: accept its terms on huggingface.co/{repo} and log in (hf auth login, or HF_TOKEN)")
    except RevisionNotFoundError:
        die(f"{repo} has no revision {revision!r}; give a branch, tag or commit that exists (or drop @...)")
    except RepositoryNotFoundError:
        die(f"{repo} is not a model on the Hugging Face hub (or it is private: log in); check the name, or give "
            f"hf:FOLDER for a folder here")
    except Exception as e:  # offline with nothing cached, a proxy...: one line
        first = (str(e).strip().splitlines() or [""])[0].split(". ")[0][:160]
        die(f"could not get {name} from the Hugging Face hub ({type(e).__name__}: {first}); go online once "
            f"(it is cached under HF_HOME), or download the folder elsewhere and pass hf:FOLDER")


def from_hf_folder(folder, read_weights):
    """(model_config, weights in our names, meta) of a Hugging Face folder; read_weights(folder) gives its tensors
    once its config.json has been found usable."""
    path = os.path.join(folder, "config.json")
    if not os.path.isfile(path):
        die(f"{folder} is not a Hugging Face model folder (no config.json)")
    arch, cfg = model_config(read_json(path, "config.json"), path)
    return vars(cfg), from_hf(cfg, read_weights(folder), arch, folder), meta_from_hf(folder, arch, cfg.vocab_size)


def model_config(hf, where):
    """(architecture, GPTConfig) of a config.json's fields; one line for a field missing or of the wrong kind."""
    try:
        arch, fields = config_from_hf(hf, where)
        return arch, GPTConfig(**fields)
    except (KeyError, TypeError, AttributeError, ValueError) as e:
        die(f"{where} is not a usable model config ({type(e).__name__}: {e})")


def export_hf(record, dest):
    """Write dest: config.json, model.safetensors, generation_config.json, tokenizer files."""
    cfg = config_from_dict(record.model_config)
    arch = hf_arch(cfg)
    try:
        from safetensors.torch import save
    except ImportError:
        die(f"export writes model.safetensors, which needs safetensors: {PIP_HF}")
    tensors = to_hf(cfg, record.model, arch)
    meta_ = record.meta or {}
    make_out_dir(dest, "--dest")
    config = hf_config(cfg, arch, meta_)
    write_json(os.path.join(dest, "config.json"), config)
    template = meta_.get("chat_template")
    stops = [template["end_id"]] if isinstance(template, dict) else meta_.get("stop_ids", [])
    stops = [i for i in dict.fromkeys(stops + [config["eos_token_id"]]) if i is not None] or [None]
    stops = stops[0] if len(stops) == 1 else stops
    write_json(os.path.join(dest, "generation_config.json"),  # generate() stops at the end of a turn, too
               dict(bos_token_id=config["bos_token_id"], eos_token_id=stops))
    path = os.path.join(dest, "model.safetensors")
    atomic_write(path, lambda f: f.write(save(tensors, metadata={"format": "pt"})), binary=True)
    if meta_:
        export_tokenizer(meta_, dest, cfg.block_size)
    print(f"wrote {dest}: {config['architectures'][0]} ({cfg.describe()}), {describe_vocab(meta_)}")


