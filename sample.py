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

from configurator import POSITIVE, check, configure, declare
from errors import die
from generate import DECODE_SETTINGS, SAMPLING_SETTINGS, Sequence, compile_decode, generate_stream, sampling_of
from inference import LOAD_SETTINGS, load_for_inference
from tokenizer import encode_prompt

# -----------------------------------------------------------------------------
RULES = declare(globals(), LOAD_SETTINGS, SAMPLING_SETTINGS, DECODE_SETTINGS)  # out_dir, init_from, temperature, ...
prompt = ""  # text to continue, or FILE:path to read it from a file; '' = start of a document
start = ""  # nanoGPT's name for prompt (used when prompt is empty)
num_samples = 1  # how many samples to draw, generated together as one batch
# -----------------------------------------------------------------------------


def read_prompt(text):
    """The prompt's text: as given, or a file's (FILE:path)."""
    if not text.startswith("FILE:"):
        return text
    if not os.path.isfile(text[5:]):
        die(f"prompt file {text[5:]} not found")
    with open(text[5:], encoding="utf-8") as f:
        return f.read()


if __name__ == "__main__":
    config, _ = configure(globals())
    check(config, dict(RULES, num_samples=POSITIVE))
    prompt = read_prompt(prompt or start)
    model, tokenizer = load_for_inference(config)
    ids = encode_prompt(tokenizer, prompt)
    if len(ids) >= model.config.block_size:
        print(f"note: the prompt is {len(ids)} tokens; only the last {model.config.block_size} are used",
              file=sys.stderr)
    stop_ids = [tokenizer.eos_id] if tokenizer.eos_id is not None else []  # a row ends at its EOS; the others go on
    samples = [Sequence(ids, config["max_new_tokens"], sampling_of(config), stop_ids, tokenizer)
               for _ in range(num_samples)]
    generator = torch.Generator(device=config["device"]).manual_seed(config["seed"])  # one batch, one random stream
    sys.stdout.write(prompt)
    decode = compile_decode(model) if config["compile"] else None
    for sample, _, text in generate_stream(model, samples, decode, generator):
        if sample is samples[0]:  # the first sample streams as it is made
            sys.stdout.write(text)
            sys.stdout.flush()
    for sample in samples[1:]:  # the others when all are done
        sys.stdout.write("\n" + "-" * 40 + "\n" + prompt + sample.text)
    sys.stdout.write("\n")
