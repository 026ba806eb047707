"""
Hugging Face interop: our parameter names mapped to theirs in both directions (GPT-2, and the decoder families:
Llama, Mistral, Qwen2/2.5, Qwen3, Gemma 3, Phi-3), config.json both ways, folders written whole, and the hub download
(OpenAI's GPT-2 by name). layout()'s rows map our names to theirs, and both directions read them; the tokenizer files
are hf_tokenizer.py's. Not run by itself.
"""

import os
import re

import torch

from dataset import atomic_write, make_out_dir, read_json, write_json
from errors import die
from hf_tokenizer import export_tokenizer, meta_from_hf, token_ids
from model import GPTConfig, config_from_dict
from tokenizer import describe_vocab

HUB_MODELS = {name: f"openai-community/{name}" for name in ("gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl")}
HF_ACTIVATIONS = {"gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "gelu": "gelu"}  # GPT-2's, ours
IGNORED = (".attn.bias", ".attn.masked_bias", ".rotary_emb.inv_freq")  # buffers (causal masks, RoPE), not weights
PIP_HF = "pip install safetensors huggingface_hub"
HUB_FILES = ["*.json", "*.safetensors", "*.jinja"]  # what a download fetches: config, weights, tokenizer, template


# the name/shape mapping, one row per tensor: (our name or None, their names, kind, sizes)
#   copy: the same tensor; conv1d: theirs is ours transposed (GPT-2's Conv1D); cat: ours is their tensors
#   stacked along dim 0 (sizes: their row counts); plus1: ours is theirs + 1 (Gemma's norms scale by 1 + w);
#   ones/zeros: we have no such tensor, theirs is that constant
# the decoder families (Llama's layout and its kin): Hugging Face's model_type -> its class name
FAMILIES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM",
            "qwen3": "Qwen3ForCausalLM", "gemma3_text": "Gemma3ForCausalLM", "phi3": "Phi3ForCausalLM"}


def layout(cfg, arch):
    """The rows for a config in a Hugging Face architecture: gpt2 or one of FAMILIES."""
    L, C = cfg.n_layer, cfg.n_embd

    def param(ours, theirs, kind, present, size):  # a weight we may lack (bias=False, norm_affine=False)
        if present:
            return ours, [theirs], kind, None
        return None, [theirs], "zeros" if kind == "bias" else "ones", size

    if arch != "gpt2":
        return family_layout(cfg, arch, param)
    rows = [("transformer.wte.weight", ["transformer.wte.weight"], "copy", None),
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
    return rows + ([] if cfg.tie_weights else [("lm_head.weight", ["lm_head.weight"], "copy", None)])


def family_layout(cfg, arch, param):
    """Llama's rows and its kin's: q/k/v biases (qwen2), q/k norms (qwen3, gemma3), norms after attention and the
    MLP with 1 + w scales (gemma3), fused qkv and gate/up matrices (phi3)."""
    hs, C, gemma = cfg.head_dim, cfg.n_embd, arch == "gemma3_text"
    qkv = [cfg.n_head * hs, cfg.n_kv_head * hs, cfg.n_kv_head * hs]
    norm = "plus1" if gemma else "copy"
    rows = [("transformer.wte.weight", ["model.embed_tokens.weight"], "copy", None)]
    for i in range(cfg.n_layer):
        ours, theirs = f"transformer.h.{i}.", f"model.layers.{i}.self_attn."
        if arch == "phi3":  # already fused as ours are
            rows += [(ours + "attn.c_attn.weight", [theirs + "qkv_proj.weight"], "copy", None),
                     (ours + "mlp.c_fc.weight", [f"model.layers.{i}.mlp.gate_up_proj.weight"], "copy", None)]
        else:
            rows += [(ours + "attn.c_attn.weight", [theirs + f"{p}_proj.weight" for p in "qkv"], "cat", qkv),
                     (ours + "mlp.c_fc.weight", [f"model.layers.{i}.mlp.{p}_proj.weight" for p in ("gate", "up")],
                      "cat", [cfg.mlp_hidden] * 2)]
        if arch == "qwen2":
            rows.append((ours + "attn.c_attn.bias", [theirs + f"{p}_proj.bias" for p in "qkv"], "cat", qkv))
        if arch in ("qwen3", "gemma3_text"):  # without qk_norm_scale ours has no learned scale: theirs is all ones
            rows += [param(ours + f"attn.{p}_norm.weight", theirs + f"{p}_norm.weight", norm, cfg.qk_norm_scale,
                           (hs,)) for p in "qk"]
        rows += [(ours + "attn.c_proj.weight", [theirs + "o_proj.weight"], "copy", None),
                 (ours + "mlp.c_proj.weight", [f"model.layers.{i}.mlp.down_proj.weight"], "copy", None)]
        norms = dict(ln_1="input_layernorm", ln_2="post_attention_layernorm") if not gemma else dict(
            ln_1="input_layernorm", post_attn_norm="post_attention_layernorm", ln_2="pre_feedforward_layernorm",
            post_mlp_norm="post_feedforward_layernorm")
        rows += [param(f"{ours}{a}.weight", f"model.layers.{i}.{b}.weight", norm, cfg.norm_affine, (C,))
                 for a, b in norms.items()]
    rows.append(param("transformer.ln_f.weight", "model.norm.weight", norm, cfg.norm_affine, (C,)))
    return rows + ([] if cfg.tie_weights else [("lm_head.weight", ["lm_head.weight"], "copy", None)])


def to_hf(cfg, state, arch):
    """Our state dict -> theirs (contiguous tensors that share no memory, as safetensors needs)."""
    out = {}
    for ours, theirs, kind, sizes in layout(cfg, arch):
        if kind in ("ones", "zeros"):
            out[theirs[0]] = getattr(torch, kind)(sizes) - float(arch == "gemma3_text" and kind == "ones")
        elif kind == "cat":
            out.update(zip(theirs, state[ours].split(sizes, dim=0), strict=True))
        else:
            out[theirs[0]] = {"conv1d": lambda w: w.t(), "plus1": lambda w: w.float() - 1}.get(kind, lambda w: w)(
                state[ours])
    return {k: v.detach().float().contiguous().clone() for k, v in out.items()}


def from_hf(cfg, tensors, arch, where):
    """Their state dict -> ours; stops with one line on a missing or unexpected tensor, or a learned
    value we cannot represent (a qk-norm scale that is not 1, say). `tensors` is emptied: each of theirs is freed as
    ours takes its place (a fused q/k/v matrix is a new tensor: no second copy of a model at once)."""
    prefix = "transformer." if arch == "gpt2" else "model."  # some checkpoints leave the base prefix out
    theirs = {(k if k.startswith(prefix) or k == "lm_head.weight" else prefix + k): v for k, v in tensors.items()
              if not k.endswith(IGNORED)}
    tensors.clear()
    state = {}
    for ours, names, kind, sizes in layout(cfg, arch):
        missing = [n for n in names if n not in theirs]
        if missing:
            die(f"{where} has no tensor {missing[0]}; is it a {arch} model of the shape config.json describes?")
        tensors_ = [theirs.pop(n).float() for n in names]  # (popped: freed once ours is made)
        if kind in ("ones", "zeros"):
            if not torch.equal(tensors_[0] + float(arch == "gemma3_text" and kind == "ones"),
                               getattr(torch, kind)(sizes)):
                die(f"{where}: {names[0]} is not all {kind[:-1]}s, which yoctoGPT's {arch} equivalent cannot represent")
        else:
            w = torch.cat(tensors_, dim=0) if len(tensors_) > 1 else tensors_[0]
            state[ours] = w.t() if kind == "conv1d" else w + 1 if kind == "plus1" else w
    theirs.pop("lm_head.weight", None)  # a tied head saved anyway
    if theirs:
        die(f"{where} has tensors yoctoGPT does not know ({', '.join(list(theirs)[:3])}); it is not a plain {arch} "
            f"model")
    if cfg.tie_weights:
        state["lm_head.weight"] = state["transformer.wte.weight"]
    return state


def hf_arch(cfg):
    """The Hugging Face architecture a config exports to, or one line naming the field that has none: GPT-2 for
    learned positions; else the simplest of the families that holds every variant the config uses."""
    for field, off in (("ngram_emb", 0),):
        if getattr(cfg, field) != off:
            die(f"{field}={getattr(cfg, field)!r} has no Hugging Face equivalent; only models without it export")
    gemma = cfg.post_norm or cfg.mlp == "geglu_tanh" or cfg.scale_emb or cfg.rope_local_theta or cfg.logit_softcap
    arch = "gpt2" if cfg.pos_emb == "learned" else "gemma3_text" if gemma else "qwen2" if cfg.qkv_bias else \
        "qwen3" if cfg.qk_norm else "mistral" if cfg.window else "llama"
    want = dict(mlp=("gelu", "gelu_tanh"), norm="layernorm", n_kv_head=cfg.n_head, qk_norm=False, window=0,
                qkv_bias=(False, cfg.bias), attn_scale=0.0, logit_softcap=0.0) \
        if arch == "gpt2" else dict(mlp=("swiglu",), norm="rmsnorm", bias=False, qk_norm=arch == "qwen3",
                                    attn_scale=0.0, window=(cfg.window,) if cfg.window_pattern == "S" else 0)
    if arch == "gemma3_text":
        want = dict(mlp=("geglu_tanh",), norm="rmsnorm", bias=False, qk_norm=True, post_norm=True, scale_emb=True)
    for field, ok in want.items():
        value = getattr(cfg, field)
        if value not in (ok if isinstance(ok, tuple) else (ok,)):
            die(f"{field}={value!r} has no Hugging Face equivalent in a model that exports as {arch} (it needs "
                f"{field}={ok!r})")
    return arch


def hf_config(cfg, arch, meta):
    """config.json for our config."""
    tok = token_ids(meta)
    common = dict(architectures=[FAMILIES.get(arch, "GPT2LMHeadModel")],
                  model_type=arch, vocab_size=cfg.vocab_size, tie_word_embeddings=cfg.tie_weights,
                  bos_token_id=tok["bos"], eos_token_id=tok["eos"], torch_dtype="float32", dtype="float32")
    if arch == "gpt2":
        return dict(common, n_positions=cfg.block_size, n_ctx=cfg.block_size, n_embd=cfg.n_embd, n_layer=cfg.n_layer,
                    n_head=cfg.n_head, n_inner=cfg.mlp_hidden, layer_norm_epsilon=cfg.norm_eps or 1e-5,
                    activation_function="gelu_new" if cfg.mlp == "gelu_tanh" else "gelu",
                    resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    rope = dict(rope_type="default", rope_theta=cfg.rope_theta)
    out = dict(common, hidden_size=cfg.n_embd, intermediate_size=cfg.mlp_hidden, num_hidden_layers=cfg.n_layer,
               num_attention_heads=cfg.n_head, num_key_value_heads=cfg.n_kv_head, head_dim=cfg.head_dim,
               max_position_embeddings=cfg.block_size, rms_norm_eps=cfg.norm_eps or torch.finfo(torch.float32).eps,
               rope_theta=cfg.rope_theta, rope_parameters=rope, hidden_act="silu", attention_bias=False,
               mlp_bias=False, attention_dropout=0.0, use_sliding_window=False, sliding_window=cfg.window or None)
    if arch != "gemma3_text":
        return out
    layers = ["sliding_attention" if cfg.is_local(i) else "full_attention" for i in range(cfg.n_layer)]
    local = dict(rope_type="default", rope_theta=cfg.rope_local_theta or cfg.rope_theta)
    return dict(out, hidden_activation="gelu_pytorch_tanh", layer_types=layers,
                rope_local_base_freq=local["rope_theta"],
                rope_parameters=dict(full_attention=rope, sliding_attention=local), attn_logit_softcapping=None,
                final_logit_softcapping=cfg.logit_softcap or None, sliding_window=cfg.window or cfg.block_size,
                query_pre_attn_scalar=round(cfg.attn_scale ** -2) if cfg.attn_scale else cfg.head_dim)


def window_of(hf, arch):
    """(window, window_pattern) of a config.json: its sliding window, and which layers use it (layer_types, or
    Qwen2's max_window_layers); the pattern is the shortest that repeats to the layers' kinds."""
    window = hf.get("sliding_window") or 0
    if arch == "qwen2" and not hf.get("use_sliding_window"):
        window = 0
    n = hf["num_hidden_layers"]
    kinds = ["S" if t == "sliding_attention" else "L" for t in hf.get("layer_types") or []]
    if arch == "qwen2" and window and not kinds:
        kinds = ["L" if i < hf.get("max_window_layers", n) else "S" for i in range(n)]
    if not window or not kinds:
        return window, "S"
    period = next(p for p in range(1, n + 1) if all(kinds[i] == kinds[i % p] for i in range(n)))
    return window, "".join(kinds[:period])


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
    if arch not in FAMILIES:
        die(f"{where}: model_type={arch!r} is not one yoctoGPT imports (gpt2, {', '.join(FAMILIES)})")
    return arch, family_config(hf, arch, where)


def family_config(hf, arch, where):
    """Our config fields for a config.json of one of FAMILIES."""
    gemma, rope = arch == "gemma3_text", hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    local = rope.get("sliding_attention", {}) if gemma else {}
    rope = rope.get("full_attention", rope) if gemma else rope
    heads, width = hf["num_attention_heads"], hf["hidden_size"]
    act = hf.get("hidden_activation" if gemma else "hidden_act") or ("gelu_pytorch_tanh" if gemma else "silu")
    checks = (("attention_bias", hf.get("attention_bias")), ("mlp_bias", hf.get("mlp_bias")),
              ("hidden_act", act != ("gelu_pytorch_tanh" if gemma else "silu")),
              ("rope_scaling", rope.get("rope_type", rope.get("type", "default")) != "default"),
              ("partial_rotary_factor", rope.get("partial_rotary_factor", hf.get("partial_rotary_factor", 1)) != 1),
              ("attn_logit_softcapping", hf.get("attn_logit_softcapping")),
              ("use_bidirectional_attention", hf.get("use_bidirectional_attention")))
    unsupported = [k for k, bad in checks if bad]
    if unsupported:
        die(f"{where}: {unsupported[0]}={hf.get(unsupported[0], rope)!r} has no yoctoGPT equivalent (it is left out: "
            f"the {arch} models that use it do not import)")
    window, pattern = window_of(hf, arch)
    theta = float(rope.get("rope_theta") or hf.get("rope_theta", 1e6 if gemma else 10000.0))
    head_dim = hf.get("head_dim") or width // heads
    return dict(vocab_size=hf["vocab_size"], block_size=hf["max_position_embeddings"], n_layer=hf["num_hidden_layers"],
                n_head=heads, n_kv_head=hf.get("num_key_value_heads") or heads, n_embd=width,
                mlp_hidden=hf["intermediate_size"], mlp="geglu_tanh" if gemma else "swiglu", bias=False,
                qkv_bias=arch == "qwen2", tie_weights=hf.get("tie_word_embeddings", arch in ("qwen3", "gemma3_text")),
                pos_emb="rope", norm="rmsnorm", norm_eps=hf.get("rms_norm_eps", 1e-6),
                qk_norm=arch in ("qwen3", "gemma3_text"), qk_norm_scale=arch in ("qwen3", "gemma3_text"),
                head_dim=head_dim, rope_theta=theta, window=window, window_pattern=pattern, post_norm=gemma,
                scale_emb=gemma, logit_softcap=float(hf.get("final_logit_softcapping") or 0.0),
                attn_scale=hf.get("query_pre_attn_scalar", head_dim) ** -0.5 if gemma else 0.0,
                rope_local_theta=float(local.get("rope_theta") or hf.get("rope_local_base_freq", 10000.0)) if gemma
                else 0.0)


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
               dict(bos_token_id=config["bos_token_id"], eos_token_id=stops, **meta_.get("generation", {})))
    path = os.path.join(dest, "model.safetensors")
    atomic_write(path, lambda f: f.write(save(tensors, metadata={"format": "pt"})), binary=True)
    if meta_:
        export_tokenizer(meta_, dest, cfg.block_size)
    print(f"wrote {dest}: {config['architectures'][0]} ({cfg.describe()}), {describe_vocab(meta_)}")


