"""
GGUF files (llama.cpp's format, as Ollama and LM Studio keep models) both ways. Read as a model source: the
architecture from the metadata (gpt2, llama, qwen2, qwen3, gemma3, phi3), every tensor dequantized with the gguf
package (F32, F16, BF16, Q8_0, Q4_0, Q4_1, the K-quants, ...), llama.cpp's own layouts undone (Llama's q/k row order
for RoPE, Gemma's 1 + w norm scales, GPT-2's transposed matrices), the tokenizer (gguf_tokenizer.py); the weights come
out under Hugging Face's names, so hf.py maps them on. Written from a run: llama.cpp's architecture, names, metadata
and tokenizer, the matrices in f32, f16, bf16, q8_0 or q4_0. Needs gguf: pip install gguf. Not run by itself.

    python chat.py --init_from=gguf:SmolLM2-135M-Instruct.Q4_1.gguf
    python convert.py --out_dir=out-bpe-small --to=gguf --dest=bpe-small.gguf --gguf_type=q8_0
"""

import os

import numpy as np
import torch

from errors import die
from gguf_tokenizer import tokenizer_meta, write_tokenizer
from hf import hf_arch, to_hf
from model import config_from_dict

PIP = "pip install gguf"
# llama.cpp's names of the architectures we represent -> Hugging Face's model_type
ARCHS = {"gpt2": "gpt2", "llama": "llama", "qwen2": "qwen2", "qwen3": "qwen3", "gemma3": "gemma3_text", "phi3": "phi3"}
# the Hugging Face architecture a run exports as -> llama.cpp's (a Mistral is its llama, as its converter has it)
GGUF_ARCHS = {"gpt2": "gpt2", "llama": "llama", "mistral": "llama", "qwen2": "qwen2", "qwen3": "qwen3",
              "gemma3_text": "gemma3"}
GEMMA_SWA_EVERY = 6  # llama.cpp's gemma3: every sixth layer global, the others windowed with RoPE base 10,000
def gguf_tokenizer(spec):
    """Our meta for the tokenizer of gguf:PATH alone (prepare_bpe.py --tokenizer=gguf:...): no tensor is read."""
    path = local_path(spec)
    return tokenizer_meta(metadata(open_reader(path)), path)


def local_path(spec):
    """gguf:PATH's path, or gguf:ORG/NAME/FILE.gguf's in the Hugging Face cache (downloaded once)."""
    path = spec.removeprefix("gguf:")
    if not os.path.isfile(path) and path.count("/") >= 2 and path.endswith(".gguf"):
        return hub_file(path)
    return path


def metadata(reader):
    return {name: field.contents() for name, field in reader.fields.items() if not name.startswith("GGUF.")}


def read_gguf(spec):
    """(Hugging Face config.json fields, their tensors by name, our tokenizer meta, the file's path) of gguf:PATH, or
    of gguf:ORG/NAME/FILE.gguf, a file of a hub repo (downloaded once into the Hugging Face cache)."""
    path = local_path(spec)
    reader = open_reader(path)
    meta = metadata(reader)
    reader.fields.clear()  # (a vocabulary's ~100,000 small arrays: freed before the weights are dequantized)
    config = hf_config(meta, {t.name for t in reader.tensors}, path)
    tokenizer = tokenizer_meta(meta, path)
    del meta
    return config, hf_tensors(reader, config, path), tokenizer, path


def hub_file(spec):
    """The local path of ORG/NAME/FILE.gguf from the Hugging Face hub (HF_HUB_OFFLINE=1: the cache only)."""
    repo, name = spec.rsplit("/", 1) if spec.count("/") == 2 else ("/".join(spec.split("/")[:2]),
                                                                     "/".join(spec.split("/")[2:]))
    try:
        from huggingface_hub import hf_hub_download
    except ImportError:
        die(f"gguf:{spec} is a file of a hub repo; downloading it needs huggingface_hub: pip install huggingface_hub")
    try:
        return hf_hub_download(repo, name)
    except Exception as e:  # offline, no such repo or file
        die(f"could not get {name} from the hub repo {repo} ({type(e).__name__}); go online once (it is cached), or "
            f"download the file and pass gguf:PATH")


def open_reader(path):
    try:
        from gguf import GGUFReader
    except ImportError:
        die(f"reading {path} needs the gguf package: {PIP}")
    if not os.path.isfile(path):
        die(f"{path} not found; give gguf:PATH of a .gguf file")
    try:
        return GGUFReader(path)
    except Exception as e:  # not GGUF, truncated, a newer version of the format
        die(f"{path} is not a readable GGUF file ({type(e).__name__}: {(str(e).splitlines() or [''])[0][:160]})")


def hf_config(meta, names, where):
    """The config.json a Hugging Face folder of the same model would hold, from the GGUF metadata."""
    arch = meta.get("general.architecture")
    if arch not in ARCHS:
        die(f"{where} holds a {arch!r} model; yoctoGPT reads GGUF files of {', '.join(ARCHS)} models")

    def key(name, default=None):
        return meta.get(f"{arch}.{name}", default)
    scaling = key("rope.scaling.type", "none")
    if scaling not in ("none", None) or "rope_factors_long.weight" in names:
        die(f"{where}: rope scaling {scaling!r} has no yoctoGPT equivalent")
    heads, width, vocab = key("attention.head_count"), key("embedding_length"), len(meta["tokenizer.ggml.tokens"])
    tied = "output.weight" not in names
    if arch == "gpt2":
        return dict(model_type="gpt2", vocab_size=vocab, n_positions=key("context_length"), n_embd=width,
                    n_layer=key("block_count"), n_head=heads, n_inner=key("feed_forward_length"),
                    layer_norm_epsilon=key("attention.layer_norm_epsilon"), activation_function="gelu_new",
                    tie_word_embeddings=tied)
    head_dim = key("attention.key_length", width // heads)
    if key("rope.dimension_count", head_dim) != head_dim:
        die(f"{where}: rotary embeddings on part of each head (partial rotary) have no yoctoGPT equivalent")
    config = dict(model_type=ARCHS[arch], vocab_size=vocab, hidden_size=width,
                  max_position_embeddings=key("context_length"), num_hidden_layers=key("block_count"),
                  num_attention_heads=heads, num_key_value_heads=key("attention.head_count_kv", heads),
                  intermediate_size=key("feed_forward_length"), rms_norm_eps=key("attention.layer_norm_rms_epsilon"),
                  rope_theta=float(key("rope.freq_base", 10000.0)), head_dim=head_dim, tie_word_embeddings=tied,
                  sliding_window=key("attention.sliding_window"), use_sliding_window=False)
    if arch == "gemma3":
        window = key("attention.sliding_window") or config["max_position_embeddings"]
        config.update(sliding_window=window, query_pre_attn_scalar=head_dim, rope_local_base_freq=10000.0,
                      final_logit_softcapping=key("final_logit_softcapping"), layer_types=[
                          "full_attention" if (i + 1) % GEMMA_SWA_EVERY == 0 else "sliding_attention"
                          for i in range(config["num_hidden_layers"])])
    return config


# Hugging Face's tensor names -> llama.cpp's: the model's own, then each block's parts (the decoder families'; Gemma 3's
# and Phi-3's differences; GPT-2's)
GGUF_NAMES = {"model.embed_tokens.weight": "token_embd", "model.norm.weight": "output_norm", "lm_head.weight": "output"}
LAYER_NAMES = {"input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm", "self_attn.q_proj": "attn_q",
               "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
               "self_attn.q_norm": "attn_q_norm", "self_attn.k_norm": "attn_k_norm", "mlp.gate_proj": "ffn_gate",
               "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down", "self_attn.qkv_proj": "attn_qkv",
               "mlp.gate_up_proj": "ffn_up"}
GEMMA_NAMES = {"post_attention_layernorm": "post_attention_norm", "pre_feedforward_layernorm": "ffn_norm",
               "post_feedforward_layernorm": "post_ffw_norm"}
GPT2_NAMES = {"transformer.wte.weight": "token_embd", "transformer.wpe.weight": "position_embd",
              "transformer.ln_f.weight": "output_norm", "transformer.ln_f.bias": "output_norm",
              "lm_head.weight": "output"}
GPT2_LAYER_NAMES = {"ln_1": "attn_norm", "attn.c_attn": "attn_qkv", "attn.c_proj": "attn_output", "ln_2": "ffn_norm",
                    "mlp.c_fc": "ffn_up", "mlp.c_proj": "ffn_down"}
FILE_TYPES = dict(f32=0, f16=1, q4_0=2, q8_0=7, bf16=32)  # general.file_type, llama.cpp's LlamaFileType


def name_maps(arch):
    """(whole-model names, per-layer names, Hugging Face's layer prefix) of llama.cpp's arch: Hugging Face's -> its."""
    if arch == "gpt2":
        return GPT2_NAMES, GPT2_LAYER_NAMES, "transformer.h."
    layers = {**LAYER_NAMES, **GEMMA_NAMES} if arch == "gemma3" else LAYER_NAMES
    if arch == "phi3":
        layers = {k: v for k, v in layers.items() if k != "mlp.up_proj"}  # its ffn_up is gate and up, fused
    return GGUF_NAMES, layers, "model.layers."


def hf_name(name, arch):
    """A llama.cpp tensor name as Hugging Face's."""
    whole, layers, prefix = name_maps(arch)
    stem, suffix = name.rsplit(".", 1)
    if not stem.startswith("blk."):
        return next(k for k, v in whole.items() if v == stem and k.endswith(suffix))
    _, i, part = stem.split(".", 2)
    return f"{prefix}{i}.{next((k for k, v in layers.items() if v == part), part)}.{suffix}"


def unpermute(w, heads):
    """llama.cpp's converter interleaves each head's q (k) rows for its RoPE kernel: (h, 2, hs/2) -> (h, hs/2, 2).
    Put them back in Hugging Face's order, which ours follows."""
    return w.reshape(heads, w.shape[0] // heads // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def hf_tensors(reader, config, where):
    """Every tensor dequantized to float32 under its Hugging Face name, in Hugging Face's layout."""
    out = {}
    for t in reader.tensors:
        w = dequantized(t, where)
        arch = config["model_type"]
        name = hf_name(t.name, {"gemma3_text": "gemma3"}.get(arch, arch))
        out[name] = to_hf_layout(w, name, config, arch)
    return out


def dequantized(t, where, rows=1024):
    """A GGUF tensor in float32, in memory of its own, dequantized `rows` rows at a time (the gguf package's
    intermediates stay small next to a 49,152-row embedding)."""
    from gguf import dequantize
    shape = tuple(reversed(t.shape.tolist()))
    data = t.data.reshape(-1, t.data.shape[-1])  # (rows, their values or quantized bytes)
    out = np.empty((len(data), int(np.prod(shape)) // len(data)), dtype=np.float32)
    try:
        for i in range(0, len(data), rows):
            out[i:i + rows] = dequantize(data[i:i + rows], t.tensor_type)
    except NotImplementedError:
        die(f"{where}: tensor {t.name} is of type {t.tensor_type.name}, which the gguf package cannot "
            f"dequantize; convert the file to another type (llama.cpp's llama-quantize)")
    return torch.from_numpy(out).reshape(shape)


def to_hf_layout(w, name, config, arch):
    """A tensor as llama.cpp stores it -> as Hugging Face does: Llama's q/k rows un-interleaved, Gemma's norm scales
    without the 1 llama.cpp adds, GPT-2's matrices transposed (its Conv1D)."""
    if arch == "llama" and name.endswith(("q_proj.weight", "k_proj.weight")):
        return unpermute(w, config["num_attention_heads" if "q_proj" in name else "num_key_value_heads"])
    if arch == "gemma3_text" and name.endswith("norm.weight"):
        return w - 1
    return w.t() if arch == "gpt2" and w.dim() == 2 and ".h." in name else w


def from_hf_layout(w, name, cfg, arch):
    """to_hf_layout's inverse, for a tensor under Hugging Face's name: as llama.cpp's arch stores it."""
    if arch == "llama" and name.endswith(("q_proj.weight", "k_proj.weight")):
        return permute(w, cfg.n_head if "q_proj" in name else cfg.n_kv_head)
    if arch == "gemma3" and name.endswith("norm.weight"):
        return w + 1
    return w.t().contiguous() if arch == "gpt2" and w.dim() == 2 and ".h." in name else w


# -----------------------------------------------------------------------------
# writing: a run as a GGUF file llama.cpp (and Ollama, LM Studio) runs


KINDS = ("f32", "f16", "bf16", "q8_0", "q4_0")  # convert.py --gguf_type: the matrices' type (norms stay f32)


def write_gguf(record, dest, kind="f16"):
    """dest, a GGUF file of a run (a checkpoint.Source) in llama.cpp's names and metadata, its matrices in `kind`,
    with its tokenizer, special ids and chat template; written whole or not at all."""
    try:
        import gguf
    except ImportError:
        die(f"--to=gguf needs the gguf package: {PIP}")
    cfg = config_from_dict(record.model_config)
    arch, hf = gguf_arch(cfg)
    tmp = dest + ".tmp"
    writer = gguf.GGUFWriter(tmp, arch)
    writer.add_name(os.path.splitext(os.path.basename(dest))[0])
    write_hparams(writer, cfg, arch, kind)
    write_tokenizer(writer, record.meta or {}, cfg.vocab_size)
    whole, layers, prefix = name_maps(arch)
    for name, w in to_hf(cfg, record.model, hf).items():
        stem, suffix = name.rsplit(".", 1)
        i, part = stem.removeprefix(prefix).split(".", 1) if stem.startswith(prefix) else (None, stem)
        add_tensor(writer, f"{whole[name]}.{suffix}" if i is None else f"blk.{i}.{layers[part]}.{suffix}",
                   from_hf_layout(w, name, cfg, arch).numpy(), kind)
    try:
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        os.replace(tmp, dest)
    except OSError as e:
        if os.path.exists(tmp):
            os.remove(tmp)
        die(f"could not write {dest} ({e.strerror}); free some space or make the folder writable")


def gguf_arch(cfg):
    """(llama.cpp's architecture, Hugging Face's) a config exports as, or one line for what llama.cpp would run
    differently; a note for what it leaves out but runs alike within its limits."""
    hf = hf_arch(cfg)
    arch = GGUF_ARCHS.get(hf)
    if arch is None:
        die(f"a {hf} model has no llama.cpp architecture that runs it alike; export it to Hugging Face (--to=hf)")
    if arch == "gemma3" and cfg.window and (
            any(cfg.is_local(i) != bool((i + 1) % GEMMA_SWA_EVERY) for i in range(cfg.n_layer))
            or (cfg.rope_local_theta or cfg.rope_theta) != 10000.0):
        die(f"llama.cpp runs Gemma 3 with its own window pattern (SSSSSL) and local RoPE base (10000); this model's "
            f"are {cfg.window_pattern} and {cfg.rope_local_theta or cfg.rope_theta:g}: export it with --to=hf")
    if arch == "gemma3" and (cfg.attn_scale not in (0.0, cfg.head_dim ** -0.5) or cfg.logit_softcap):
        die("llama.cpp's Gemma 3 scales queries by 1/sqrt(head_dim) and caps no logits; export it with --to=hf")
    if hf == "mistral":
        print(f"note: llama.cpp's llama attends over the whole context, with no sliding window of {cfg.window}: its "
              f"logits differ from ours past the window")
    if arch == "gpt2" and cfg.mlp == "gelu":
        print("note: llama.cpp's gpt2 computes GELU in its tanh form: its logits differ from ours slightly")
    return arch, hf


def write_hparams(writer, cfg, arch, kind):
    """The architecture's numbers in llama.cpp's keys."""
    hs = cfg.head_dim
    rope = () if arch == "gpt2" else (
        (writer.add_head_count_kv, cfg.n_kv_head), (writer.add_key_length, hs), (writer.add_value_length, hs),
        (writer.add_rope_dimension_count, hs), (writer.add_rope_freq_base, cfg.rope_theta),
        (writer.add_layer_norm_rms_eps, cfg.norm_eps or torch.finfo(torch.float32).eps))
    for add, value in ((writer.add_block_count, cfg.n_layer), (writer.add_context_length, cfg.block_size),
                       (writer.add_embedding_length, cfg.n_embd), (writer.add_feed_forward_length, cfg.mlp_hidden),
                       (writer.add_head_count, cfg.n_head), *rope, (writer.add_vocab_size, cfg.vocab_size),
                       (writer.add_file_type, FILE_TYPES[kind])):
        add(value)
    if arch == "gpt2":
        writer.add_layer_norm_eps(cfg.norm_eps or 1e-5)
    if arch == "gemma3" and cfg.window:
        writer.add_sliding_window(cfg.window)


def permute(w, heads):
    """Hugging Face's q (k) rows in llama.cpp's interleaved order for its RoPE kernel (unpermute's inverse)."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def add_tensor(writer, name, w, kind):
    """One tensor in `kind`: vectors (norms) in float32, a matrix whose rows do not split into blocks of 32 (q8_0,
    q4_0) in f16."""
    from gguf import GGMLQuantizationType as T
    from gguf import quants
    if w.ndim == 1 or kind == "f32":
        writer.add_tensor(name, w.astype(np.float32))
    elif kind == "f16" or (kind in ("q8_0", "q4_0") and w.shape[-1] % 32):
        writer.add_tensor(name, w.astype(np.float16))
    else:
        qtype = {"bf16": T.BF16, "q8_0": T.Q8_0, "q4_0": T.Q4_0}[kind]
        writer.add_tensor(name, quants.quantize(w.astype(np.float32), qtype), raw_dtype=qtype)
