"""
Evaluate a model: scores on standard benchmarks through EleutherAI's lm-evaluation-harness (its tasks, its numbers;
pip install lm-eval), or bits per byte on any text (no harness needed), comparable across tokenizers.

    python eval.py --out_dir=out-bpe-small --tasks=hellaswag,arc_easy --limit=200
    python eval.py --init_from=gpt2 --tasks=hellaswag --batch_size=32 --output=gpt2-hellaswag.json
    python eval.py --out_dir=out-char-tiny --tasks=my_task --include_path=tasks/     # local task YAMLs, offline
    python eval.py --out_dir=out-char-tiny --text=notes.txt                          # bits per byte on a text
"""

import json
import os

from chat_templates import template_for
from configurator import NON_NEGATIVE, POSITIVE, check, configure, declare
from dataset import atomic_write, check_writable, decode_text
from errors import die
from harness import YoctoLM, main_scores, run_tasks, table, text_scores
from inference import LOAD_SETTINGS, load_for_inference

# -----------------------------------------------------------------------------
RULES = declare(globals(), LOAD_SETTINGS)  # out_dir, ckpt, init_from, ema, block_size, device, dtype, quantize
tasks = ""  # harness tasks, comma-separated (e.g. hellaswag,arc_easy,piqa,lambada_openai)
limit = 0  # evaluate only the first N items of each task (0 = all)
num_fewshot = -1  # examples in each prompt (-1 = the task's default)
include_path = ""  # a folder of local task YAMLs (they work offline)
apply_chat_template = False  # render prompts with the model's chat template (for chat models, where tasks ask)
output = ""  # write the harness's results (and per-item samples) as JSON here
text = ""  # a UTF-8 text file: loss per token and bits per byte of the model on it (no harness)
stride = 0  # --text: tokens between windows (0 = block_size // 2); each token is scored once
batch_size = 16  # sequences per forward
# -----------------------------------------------------------------------------

if __name__ == "__main__":
    config, explicit = configure(globals())
    check(config, dict(RULES, limit=NON_NEGATIVE, stride=NON_NEGATIVE, batch_size=POSITIVE,
                       num_fewshot=(lambda v: v >= -1, ">= 0, or -1 for the task's default")))
    if bool(text) == bool(tasks):
        die("give --tasks=NAME[,NAME...] (the harness) or --text=FILE (bits per byte on a text), one of them")
    if "limit" in explicit and limit == 0 and tasks:  # --limit=0 said on purpose
        die("--limit=0 evaluates nothing; give a positive number of items per task, or leave --limit out for all")
    if text:  # every check before the model loads
        if not os.path.isfile(text):
            die(f"--text={text} not found")
        with open(text, "rb") as f:
            body = decode_text(f.read(), text)
        if not body.strip():
            die(f"--text={text} is empty; give a text with some content")
    if output:
        check_writable(os.path.dirname(os.path.abspath(output)), "--output's folder")
    model, tokenizer = load_for_inference(config)  # (log-probabilities are computed in float32 whatever the dtype)
    if text:
        if hasattr(tokenizer, "known") and tokenizer.known(body)[1]:
            die(f"--text={text} has characters the model's vocabulary lacks: "
                f"{' '.join(map(repr, tokenizer.known(body)[1][:10]))}")
        if stride > model.config.block_size:
            die(f"--stride={stride} is longer than the model's block_size={model.config.block_size}; lower it")
        loss, bpb, scored = text_scores(model, tokenizer, body, stride or max(model.config.block_size // 2, 1),
                                        batch_size)
        print(f"{text}: {scored:,} tokens scored, loss {loss:.4f} per token, {bpb:.4f} bits per byte")
        result = dict(text=text, tokens=scored, loss=loss, bits_per_byte=bpb)
    else:
        lm = YoctoLM(model, tokenizer, batch_size,
                     template_for(getattr(tokenizer, "meta", None), tokenizer) if apply_chat_template else None)
        names = [t.strip() for t in tasks.split(",") if t.strip()]
        result = run_tasks(lm, names, limit or None, None if num_fewshot < 0 else num_fewshot, include_path,
                           apply_chat_template, samples=bool(output))
        print(table(result))
        print("  ".join(f"{task} {metric} {value:.4f}" for task, (metric, value) in main_scores(result).items()))
    if output:
        atomic_write(output, lambda f: f.write(json.dumps(result, indent=1, default=str)))
        print(f"wrote {output}")
