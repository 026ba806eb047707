"""
Generate text from a trained checkpoint, streamed to stdout as it is sampled. The checkpoint
carries the architecture and the tokenizer, so only out_dir is needed.

    python sample.py --out_dir=out-char-tiny
    python sample.py --out_dir=out-char-tiny --prompt="The with statement" --num_samples=3 --temperature=0.7
    python sample.py --out_dir=out-char-tiny --prompt=FILE:prompt.txt --top_p=0.9 --seed=7
    python sample.py --init_from=gpt2 --start="Once upon a time" --num_samples=4 --compile=True
"""

import os
import sys

import torch

from checkpoint import load_for_inference
from common import DTYPES, SAMPLING_RULES, pick_device, pick_dtype
from configurator import NON_NEGATIVE, POSITIVE, check, configure, die
from generate import compile_decode, controls, generate_stream
from quantize import check_kind, for_decoding
from tokenizer import StreamDecoder, encode_prompt

# -----------------------------------------------------------------------------
out_dir = "out-char-tiny"  # the training run to sample from
ckpt = ""  # checkpoint file in out_dir; '' = ckpt.pt, or best.pt if that is all there is
# resume (out_dir's checkpoint) | gpt2 | gpt2-medium | gpt2-large | gpt2-xl | hf:FOLDER | a run or ckpt
init_from = "resume"
prompt = ""  # text to continue, or FILE:path to read it from a file; '' = start of a document
start = ""  # nanoGPT's name for prompt (used when prompt is empty)
num_samples = 1  # how many samples to draw, generated together as one batch
max_new_tokens = 500  # tokens to generate per sample
temperature = 0.8  # 1.0 = the model's distribution, lower = more conservative, 0 = greedy
top_k = 200  # sample from the k likeliest tokens only (0 = all)
top_p = 1.0  # nucleus sampling: the smallest set of tokens whose probability reaches p (1.0 = off)
min_p = 0.0  # drop tokens less likely than min_p times the likeliest one (0 = off)
repetition_penalty = 1.0  # > 1 makes tokens already in the text less likely (CTRL's penalty; 1.0 = off)
no_repeat_ngram_size = 0  # n > 0: never repeat an n-gram of the text (0 = off)
seed = 1337  # random seed (the same seed and settings give the same text)
device = ""  # cpu | cuda | mps; '' picks cuda > mps > cpu
dtype = "auto"  # float32 | bfloat16 | float16 (the weights are converted) | auto (bfloat16 on GPUs, float32 on CPU)
ema = False  # sample from the run's moving average of the weights (trained with --ema_decay)
block_size = 0  # a shorter context than the model's, for a smaller KV cache (0 = the model's)
compile = False  # torch.compile the one-token decode step (start-up cost, then faster tokens)
quantize = ""  # int8: weight-only int8 matrices, ~1.8x the tokens/s on a CPU (the greedy tokens may differ a little)
# -----------------------------------------------------------------------------


if __name__ == "__main__":
    config, _ = configure(globals())
    check(config, dict(SAMPLING_RULES, num_samples=POSITIVE, block_size=NON_NEGATIVE))
    check_kind(quantize)
    prompt = prompt or start
    if prompt.startswith("FILE:"):
        path = prompt[5:]
        if not os.path.isfile(path):
            die(f"prompt file {path} not found")
        with open(path, encoding="utf-8") as f:
            prompt = f.read()
    device = pick_device(device)
    dtype = pick_dtype(dtype, device)
    model, tokenizer = load_for_inference(out_dir if init_from == "resume" else init_from, device, ckpt, ema,
                                          block_size)
    model = for_decoding(model.to(DTYPES[dtype]), quantize)  # faster to read per token
    ids = encode_prompt(tokenizer, prompt)
    if len(ids) >= model.config.block_size:
        print(f"note: the prompt is {len(ids)} tokens; only the last {model.config.block_size} are used",
              file=sys.stderr)
    x = torch.tensor([ids] * num_samples, dtype=torch.long, device=device)  # all samples in one batch
    generator = torch.Generator(device=device).manual_seed(seed)
    decode = compile_decode(model) if compile else None
    rows, done = [[] for _ in range(num_samples)], [False] * num_samples
    decoder = StreamDecoder(tokenizer)
    sys.stdout.write(prompt)
    for tokens in generate_stream(model, x, max_new_tokens, eos_id=tokenizer.eos_id, decode=decode, generator=generator,
                                        **controls(config)):
        for i, t in enumerate(tokens.tolist()):
            done[i] = done[i] or t == tokenizer.eos_id  # a row ends at its EOS; the others go on
            if not done[i]:
                rows[i].append(t)
                if i == 0:  # the first sample streams as it is made
                    sys.stdout.write(decoder.push(t))
                    sys.stdout.flush()
    sys.stdout.write(decoder.flush())
    for row in rows[1:]:  # the others when all are done
        sys.stdout.write("\n" + "-" * 40 + "\n" + prompt + tokenizer.decode(row))
    sys.stdout.write("\n")
