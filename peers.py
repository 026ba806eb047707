"""
The peers bench.py times our decoding against, on the same weights: transformers' generate() on a twin model (hf.py's
export mapping), and llama.cpp (llama-cpp-python) on a GGUF file of the model (gguf_file.py's export). Each is a
run(prompt (B, 1), n) -> B lists of n greedy tokens. Not run by itself.
"""

import os
import tempfile

import torch

from errors import die
from gguf_file import write_gguf
from hf import hf_arch, hf_config, to_hf


def transformers_decoder(model, compiled, use_cache):
    """transformers' generate() on a twin of `model` with the same weights, in the same dtype."""
    try:
        import transformers
    except ImportError:
        die("--impl=transformers needs transformers: pip install transformers")
    arch = hf_arch(model.config)
    dtype = next(model.parameters()).dtype
    twin = transformers.AutoModelForCausalLM.from_config(transformers.AutoConfig.for_model(
        **hf_config(model.config, arch, {})), dtype=dtype).to(dtype).eval()
    twin.load_state_dict({k: v.to(dtype) for k, v in to_hf(model.config, model.state_dict(), arch).items()},
                         strict=not model.config.tie_weights)
    if compiled:
        twin.forward = torch.compile(twin.forward)
    return lambda prompt, n: twin.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=n,
                                           min_new_tokens=n, do_sample=False, use_cache=use_cache,
                                           pad_token_id=0)[:, prompt.size(1):].tolist()


def llama_cpp_decoder(source, kind, folder):
    """llama.cpp on the model written as a GGUF file in `folder`: float32 matrices (kind ''), Q8_0 (int8) or Q4_0
    (int4), the types our --quantize kinds compare with; as many threads as torch uses."""
    try:
        from llama_cpp import Llama
    except ImportError:
        die("--impl=llama.cpp needs llama-cpp-python: pip install llama-cpp-python (it builds llama.cpp with cmake)")
    if not (source.meta or {}).get("tokenizer"):
        die("--impl=llama.cpp needs a model with its tokenizer: give --model=SOURCE (gguf:FILE, hf:..., a run)")
    path = os.path.join(folder, f"model-{kind or 'f32'}.gguf")
    if not os.path.isfile(path):
        write_gguf(source, path, {"": "f32", "int8": "q8_0", "int4": "q4_0"}[kind])
    llm = Llama(model_path=path, n_ctx=source.model_config["block_size"], n_threads=torch.get_num_threads(),
                n_batch=512, verbose=False)

    def run(prompt, n):
        rows = []
        for row in prompt.tolist():
            llm.reset()
            rows.append(llama_greedy(llm, row, n))
        return rows
    return run


def llama_greedy(llm, ids, n):
    """llama.cpp's (a llama_cpp.Llama's) n greedy tokens after ids."""
    out = []
    for token in llm.generate(ids, top_k=1, top_p=1.0, temp=0.0, repeat_penalty=1.0):
        out.append(token)
        if len(out) == n:
            return out


def scratch():
    """A temporary folder for the peers' files, removed at exit."""
    return tempfile.TemporaryDirectory(prefix="bench-peers-")
