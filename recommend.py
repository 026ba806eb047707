"""
Recommend a training run for a time budget. Reads a prepared dataset (tokens, vocabulary), measures this device's
training speed on a ladder of model shapes for a second or two each, and prints the train.py command it
recommends with its reasons: the tokens the budget buys, the passes over the data, why that size, why that dropout.
The rules were fitted on runs recorded in BENCHMARKS.md ("The time-budget recommender") and checked on corpora they
were not fitted on.

    python recommend.py --dataset=shakespeare_char --max_time=120
    python recommend.py --dataset=pydocs_bpe --max_time=600 --run=True
"""

import os
import shlex
import subprocess
import sys
import time

from configurator import ABOVE_ZERO, check, configure, die

HERE = os.path.dirname(os.path.abspath(__file__))

# -----------------------------------------------------------------------------
dataset = "pydocs_char"  # a folder in data/ written by prepare_char.py or prepare_bpe.py
max_time = 60.0  # seconds of training the run may take (compile, start-up and the two evals come on top)
device = "auto"  # auto | cpu | cuda | cuda:N | mps: where to measure and train
priority = "quality"  # quality: all of the budget, for the lowest val loss; speed: stop where more time buys little
out_dir = ""  # the recommended run's out_dir; '' = out-<dataset>-<max_time>s
run = False  # True: run the recommended command after printing it
# -----------------------------------------------------------------------------

# The shapes to choose from, smallest first: (n_layer, n_head, n_embd, block_size, batch_size). The first is
# config/shakespeare_char_cpu.py's; every rung is that recipe (gpt_fast, n-gram tables, Muon, WSD) made larger.
LADDER = [(1, 2, 96, 128, 24), (2, 4, 128, 128, 24), (4, 4, 192, 128, 32), (6, 6, 256, 256, 16),
          (8, 8, 384, 256, 32), (12, 12, 768, 512, 32)]
TOKENS_PER_WEIGHT = 10  # a larger shape only when the budget shows it this many tokens per block weight
DROPOUT = [(4, 0.0), (12, 0.1), (float("inf"), 0.2)]  # (passes over the training tokens up to, dropout)
PLATEAU_PASSES = 3  # priority=speed: the first rung stops improving after about this many passes


def block_weights(shape):
    """The weights of the transformer blocks (embeddings and n-gram tables left out): what the budget has to train."""
    n_layer, _, n_embd, _, _ = shape
    return n_layer * 12 * n_embd ** 2


def measure(shape, vocab_size, device_name, seconds=1.0):
    """Training tokens per second of one shape on the device (uncompiled forward, backward and AdamW step on random
    tokens); None when it does not fit in memory."""
    import torch

    from common import autocast, pick_dtype
    from model import GPT, config_from_preset
    n_layer, n_head, n_embd, block_size, batch_size = shape
    torch.manual_seed(0)
    try:
        model = GPT(config_from_preset("gpt_fast", n_layer=n_layer, n_head=n_head, n_embd=n_embd, block_size=block_size,
                                       vocab_size=vocab_size, ngram_emb=3, dropout=0.0)).to(device_name)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
        ctx = autocast(device_name, pick_dtype("auto", device_name))
        x = torch.randint(0, vocab_size, (batch_size, block_size), device=device_name)
        steps, t0 = -1, 0.0
        while steps < 2 or time.perf_counter() - t0 < seconds:
            with ctx:
                _, loss = model(x, x)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            if device_name.startswith("cuda"):
                torch.cuda.synchronize()
            steps += 1
            if steps == 0:  # the first step warms up
                t0 = time.perf_counter()
        return steps * batch_size * block_size / (time.perf_counter() - t0)
    except torch.OutOfMemoryError:
        return None


def plan(speeds, train_tokens, budget, priority):
    """The recommendation from measured speeds (tokens/s per rung, None past what fits): rung, seconds, dropout and
    the reasons, one line each."""
    rung = 0
    for i, tps in enumerate(speeds):
        if tps and tps * budget >= TOKENS_PER_WEIGHT * block_weights(LADDER[i]):
            rung = i
    why = []
    seconds = budget
    if priority == "speed":
        seconds = min(budget, PLATEAU_PASSES * train_tokens / speeds[0])
        rung = 0
        why.append(f"priority=speed: the smallest shape, stopped after ~{PLATEAU_PASSES} passes over the data "
                   f"({seconds:.0f} s), where it stops improving")
    tokens = speeds[rung] * seconds
    passes = tokens / train_tokens
    dropout = next(p for limit, p in DROPOUT if passes <= limit)
    n_layer, n_head, n_embd, block_size, batch_size = LADDER[rung]
    why.append(f"~{tokens / 1e6:.1f} M tokens in {seconds:.0f} s at the measured {speeds[rung]:,.0f} tokens/s "
               f"(uncompiled; the compiled run sees somewhat more): {passes:.1f} passes over {train_tokens / 1e6:.2f} M "
               f"training tokens")
    weights = block_weights(LADDER[rung])
    reason = f"{tokens / weights:.0f} tokens per block weight ({weights / 1e6:.2f} M weights)"
    if rung + 1 < len(speeds) and speeds[rung + 1]:
        up = LADDER[rung + 1]
        reason += (f"; the next size up ({up[0]} × {up[2]}) would see {speeds[rung + 1] * seconds / block_weights(up):.1f}"
                   f" per weight, below the {TOKENS_PER_WEIGHT} it needs to pay off")
    why.append(f"{n_layer} layer{'s' * (n_layer > 1)} × {n_embd} wide ({n_head} heads), block {block_size}, "
               f"batch {batch_size}: {reason}")
    why.append(f"dropout {dropout}: " + ("few passes, nothing to regularise" if not dropout else
                                         f"{passes:.0f} passes would overfit without it"))
    return rung, seconds, dropout, why


def command(rung, seconds, dropout, device_name, run_dir):
    n_layer, n_head, n_embd, block_size, batch_size = LADDER[rung]
    return ["train.py", "config/shakespeare_char_cpu.py", f"--dataset={dataset}", f"--out_dir={run_dir}",
            f"--device={device_name}", f"--max_time={seconds:g}", f"--n_layer={n_layer}", f"--n_head={n_head}",
            f"--n_embd={n_embd}", f"--block_size={block_size}", f"--batch_size={batch_size}", f"--dropout={dropout}"]


if __name__ == "__main__":
    configure(globals())
    check(globals(), dict(max_time=ABOVE_ZERO))
    if priority not in ("quality", "speed"):
        die(f"--priority={priority!r} is not one of quality, speed")
    import numpy as np

    from common import pick_device, read_meta
    data_dir = os.path.join(HERE, "data", dataset)
    meta = read_meta(data_dir)
    if "chat_template" in meta:
        die(f"data/{dataset} is a conversation dataset; fine-tune on it with config/sft_pydocs.py (see the README), "
            f"the recommender plans pre-training runs")
    train_path = os.path.join(data_dir, "train.bin")
    train_tokens = os.path.getsize(train_path) // np.dtype(meta["dtype"]).itemsize if os.path.isfile(train_path) else 0
    if train_tokens <= LADDER[0][3]:
        die(f"{train_path} is missing or holds fewer than {LADDER[0][3] + 1} tokens; prepare the dataset again")
    device_name = pick_device(device)
    run_dir = out_dir or f"out-{dataset}-{max_time:g}s"
    speeds = []
    for shape in LADDER:  # measured smallest first; a rung that cannot pay off at this budget ends the ladder
        if shape[3] >= train_tokens:
            break
        tps = measure(shape, meta["vocab_size"], device_name)
        speeds.append(tps)
        print(f"measured {shape[0]} × {shape[2]}, block {shape[3]}, batch {shape[4]}: "
              + (f"{tps:,.0f} tokens/s" if tps else "does not fit in memory"), file=sys.stderr)
        if not tps or tps * max_time < TOKENS_PER_WEIGHT * block_weights(shape):
            break
    rung, seconds, dropout, why = plan(speeds, train_tokens, max_time, priority)
    cmd = command(rung, seconds, dropout, device_name, run_dir)
    print("python " + " ".join(shlex.quote(a) for a in cmd))
    for line in why:
        print(f"  # {line}")
    if run:
        sys.exit(subprocess.call([sys.executable, *cmd], cwd=HERE))
