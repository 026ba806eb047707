"""
Generate text from a trained checkpoint, streamed to stdout as it is sampled. The checkpoint
carries the architecture and the tokenizer, so only out_dir is needed.

    python sample.py --out_dir=out-char-tiny
    python sample.py --out_dir=out-char-tiny --prompt="The with statement" --num_samples=3 --temperature=0.7
    python sample.py --out_dir=out-char-tiny --prompt=FILE:prompt.txt --top_p=0.9 --seed=7
"""

import os
import sys

import torch

from common import SAMPLING_RULES, autocast, load_for_inference, pick_device, pick_dtype
from configurator import POSITIVE, check, configure, die
from tokenizer import StreamDecoder

# -----------------------------------------------------------------------------
out_dir = "out-char-tiny"  # the training run to sample from
ckpt = ""  # checkpoint file in out_dir; '' = ckpt.pt, or best.pt if that is all there is
prompt = ""  # text to continue, or FILE:path to read it from a file; '' = start of a document
num_samples = 1  # how many samples to draw
max_new_tokens = 500  # tokens to generate per sample
temperature = 0.8  # 1.0 = the model's distribution, lower = more conservative, 0 = greedy
top_k = 200  # sample from the k likeliest tokens only (0 = all)
top_p = 1.0  # nucleus sampling: the smallest set of tokens whose probability reaches p (1.0 = off)
seed = 1337  # random seed (the same seed and settings give the same text)
device = ""  # cpu | cuda | mps; '' picks cuda > mps > cpu
dtype = "auto"  # float32 | bfloat16 | float16 | auto
# -----------------------------------------------------------------------------


def encode_prompt(tokenizer, text):
    """Token ids for the prompt, primed with BOS when the tokenizer has one; stops with one line
    listing any characters the vocabulary lacks."""
    try:
        ids = tokenizer.encode(text)
    except ValueError as e:
        die(f"the prompt has {e}; rephrase it with characters the model knows")
    if tokenizer.bos_id is not None:
        ids = [tokenizer.bos_id] + ids
    if not ids:  # a char model with an empty prompt: start from a newline, or token 0
        try:
            ids = tokenizer.encode("\n")[:1] or [0]
        except ValueError:
            ids = [0]
    return ids


if __name__ == "__main__":
    configure(globals())
    check(globals(), dict(SAMPLING_RULES, num_samples=POSITIVE))
    if prompt.startswith("FILE:"):
        path = prompt[5:]
        if not os.path.isfile(path):
            die(f"prompt file {path} not found")
        with open(path, encoding="utf-8") as f:
            prompt = f.read()
    device = pick_device(device)
    dtype = pick_dtype(dtype, device)
    model, tokenizer = load_for_inference(out_dir, ckpt, device)
    ids = encode_prompt(tokenizer, prompt)
    if len(ids) >= model.config.block_size:
        print(f"note: the prompt is {len(ids)} tokens; only the last {model.config.block_size} are used", file=sys.stderr)
    x = torch.tensor([ids], dtype=torch.long, device=device)
    generator = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad(), autocast(device, dtype):
        for i in range(num_samples):
            sys.stdout.write(prompt)
            decoder = StreamDecoder(tokenizer)
            for token in model.generate_stream(x, max_new_tokens, temperature=temperature, top_k=top_k or None,
                                               top_p=top_p, eos_id=tokenizer.eos_id, generator=generator):
                if token.item() == tokenizer.eos_id:
                    break
                sys.stdout.write(decoder.push(token.item()))
                sys.stdout.flush()
            sys.stdout.write("\n" + ("-" * 40 + "\n" if i < num_samples - 1 else ""))
            sys.stdout.flush()
