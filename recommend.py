"""
Recommend a training run for a time budget. Reads a prepared dataset (tokens, vocabulary), measures this device's
training speed on a ladder of model shapes for a second or two each, and prints the train.py command it
recommends with its reasons: the tokens the budget buys, the passes over the data, why that size, and where to stop.
The rules were fitted on runs recorded in BENCHMARKS.md ("The time-budget recommender") and checked on corpora they
were not fitted on.

Where the rules cannot tell its plan from config/shakespeare_char_cpu.py's own command (see `unsure`), --run=True
trains both and says which did better, so the plan it runs is never worse than the recipe on the machine it runs on.

    python recommend.py --dataset=shakespeare_char --max_time=120
    python recommend.py --dataset=pydocs_bpe --max_time=600 --run=True
"""

import math
import os
import shlex
import subprocess
import sys
import time

import numpy as np
import torch

from configurator import ABOVE_ZERO, check, configure
from dataset import check_bins, read_meta
from errors import die
from hardware import autocast, pick_device, pick_dtype
from model import GPT, config_from_preset
from runlog import read_metrics

HERE = os.path.dirname(os.path.abspath(__file__))

# -----------------------------------------------------------------------------
dataset = "pydocs_char"  # a folder in data/ written by prepare_char.py or prepare_bpe.py
max_time = 60.0  # seconds of training the run may take (compile, start-up and the two evals come on top)
device = "auto"  # auto | cpu | cuda | cuda:N | mps: where to measure and train
# quality: the lowest val loss the budget buys; speed: the smallest shape, stopped where it levels off
priority = "quality"
out_dir = ""  # the recommended run's out_dir; '' = out-<dataset>-<max_time>s
run = False  # True: run the recommended command after printing it
train_args = ""  # more train.py arguments for the command, e.g. "--compile=False --eval_iters=50"
# with run=True, also train the recipe's own command and compare: auto (where the rules cannot tell) | always | never
compare = "auto"
# -----------------------------------------------------------------------------

# The shapes to choose from, smallest first: (n_layer, n_head, n_embd, block_size, batch_size). The first is
# config/shakespeare_char_cpu.py's; every rung is that recipe (gpt_fast, n-gram tables, Muon, WSD) made larger.
LADDER = [(1, 2, 96, 128, 24), (2, 4, 128, 128, 24), (4, 4, 192, 128, 32), (6, 4, 256, 256, 16),
          (8, 8, 384, 256, 32), (12, 12, 768, 512, 32)]
TOKENS_PER_WEIGHT = 10  # a larger shape pays off when its run sees this many tokens per block weight (time-limited)
MIN_PASSES = 4  # ... or, when it makes this many passes over the training tokens in the budget (data-limited), ...
MIN_TOKENS_PER_WEIGHT = 2  # ... this many: a small model would run out of data and leave time unused
BOUND_TOKENS_PER_WEIGHT = 0.5  # a token-level run that ends at TOKEN_PASSES inside the budget: the time left buys size
TABLE_PASSES = 5  # the recipe's n-gram tables only for runs of at most this many passes: past them they memorise
MAX_PASSES = 10  # a character-level run without the tables stops after this many passes over the training tokens
TOKEN_PASSES = 3  # a token-level run after this many: a BPE token's embedding memorises sooner than a character's
SPEED_PASSES = 3  # priority=speed: the smallest shape, stopped where its val loss levels off
NGRAM_MAX_VOCAB = 256  # the n-gram tables for character (or byte) vocabularies only; on larger ones they memorise
UNSURE_PASSES = 15  # the recipe's tables at TABLE_PASSES to this many passes may still pay: the rules cannot tell


def block_weights(shape):
    """The weights of the transformer blocks (embeddings and n-gram tables left out): what the budget has to train."""
    n_layer, _, n_embd, _, _ = shape
    return n_layer * 12 * n_embd ** 2


def measure(shape, vocab_size, ngram, device_name, seconds=1.0):
    """Training tokens per second of one shape on the device (forward, backward and an AdamW step on random tokens,
    uncompiled, for about `seconds`); None when it does not fit in the device's memory."""
    n_layer, n_head, n_embd, block_size, batch_size = shape
    sync = {"cuda": torch.cuda.synchronize, "mps": torch.mps.synchronize}.get(device_name.split(":")[0], lambda: None)
    torch.manual_seed(0)
    try:
        model = GPT(config_from_preset("gpt_fast", n_layer=n_layer, n_head=n_head, n_embd=n_embd, block_size=block_size,
                                       vocab_size=vocab_size, ngram_emb=ngram, dropout=0.0)).to(device_name)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
        ctx = autocast(device_name, pick_dtype("auto", device_name, n_embd, batch_size * block_size))  # as train.py
        x = torch.randint(0, vocab_size, (batch_size, block_size), device=device_name)
        steps, t0 = -1, 0.0
        while steps < 2 or time.perf_counter() - t0 < seconds:
            with ctx:
                _, loss = model(x, x)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            sync()
            steps += 1
            if steps == 0:  # the first step warms up
                t0 = time.perf_counter()
        return steps * batch_size * block_size / (time.perf_counter() - t0)
    except RuntimeError as e:  # torch.OutOfMemoryError on CUDA, a RuntimeError saying so on MPS
        if "out of memory" not in str(e).lower():
            raise
        return None


def pass_limit(char_vocab):
    """The passes over the training tokens after which a run without n-gram tables stops."""
    return MAX_PASSES if char_vocab else TOKEN_PASSES


def pays(tps, shape, train_tokens, budget, char_vocab):
    """Whether a shape measured at `tps` tokens/s is worth its size: its run sees TOKENS_PER_WEIGHT tokens per block
    weight, or MIN_TOKENS_PER_WEIGHT when the budget makes MIN_PASSES passes over the data, or, token-level, only
    BOUND_TOKENS_PER_WEIGHT when it finishes TOKEN_PASSES passes inside the budget; only the passes up to the pass
    limit count."""
    tokens, limit = (tps * budget if tps else 0), pass_limit(char_vocab) * train_tokens
    return min(tokens, limit) >= need_per_weight(tokens, train_tokens, char_vocab) * block_weights(shape)


def need_per_weight(tokens, train_tokens, char_vocab):
    """The tokens per block weight a shape's run must see to pay off, for the tokens the budget buys it."""
    if not char_vocab and tokens >= TOKEN_PASSES * train_tokens:
        return BOUND_TOKENS_PER_WEIGHT
    return TOKENS_PER_WEIGHT if tokens < MIN_PASSES * train_tokens else MIN_TOKENS_PER_WEIGHT


def plan(speeds, train_tokens, budget, priority, char_vocab):
    """The recommendation from measured speeds (tokens/s per rung, None past what fits): rung, seconds of training,
    the iterations that end it where a pass limit does (None: the budget ends it), n-gram tables or not, and the
    reasons, one line each. The largest rung that pays off is taken (the first when none does); the tables only for
    a character vocabulary and a run of at most TABLE_PASSES passes; without them the run stops at the pass limit if
    the budget would go past it."""
    fits = [i for i, tps in enumerate(speeds) if pays(tps, LADDER[i], train_tokens, budget, char_vocab)]
    rung = 0 if priority == "speed" else max([0] + fits)
    tps = speeds[rung]
    passes = tps * budget / train_tokens  # in the whole budget
    ngram = char_vocab and (passes <= TABLE_PASSES or priority == "speed")
    cap = SPEED_PASSES if priority == "speed" else TABLE_PASSES if ngram else pass_limit(char_vocab)
    seconds = min(budget, cap * train_tokens / tps)
    tokens = tps * seconds
    n_layer, n_head, n_embd, block_size, batch_size = LADDER[rung]
    iters = math.ceil(cap * train_tokens / (batch_size * block_size)) if seconds < budget else None  # passes, not time
    weights = block_weights(LADDER[rung])
    why = [f"~{tokens / 1e6:.1f} M tokens in {seconds:.0f} s at the {tps:,.0f} tokens/s measured: "
           f"{tokens / train_tokens:.1f} passes over {train_tokens / 1e6:.2f} M training tokens"]
    if seconds < budget:
        why.append(f"stopped at {cap} passes ({iters:,} iterations, ~{seconds:.0f} of the {budget:g} s): "
                   + ("the smallest shape levels off there (priority=speed)" if priority == "speed" else
                      "more passes over this data overfit; a larger corpus would use the time"))
    reason = (f"{tokens / weights:.2g} tokens per block weight ({weights / 1e6:.2f} M weights)"
              + (f", {passes:.1f} passes in the budget" if priority == "quality" else ""))
    if priority == "quality" and rung and not char_vocab and passes >= TOKEN_PASSES:
        reason += (f"; it makes its {TOKEN_PASSES} passes inside the budget, so the time left buys size "
                   f"({BOUND_TOKENS_PER_WEIGHT:g} per weight pays off)")
    if priority == "quality" and rung + 1 < len(speeds) and speeds[rung + 1]:
        up, up_tokens = LADDER[rung + 1], speeds[rung + 1] * budget
        usable = min(up_tokens, pass_limit(char_vocab) * train_tokens)
        need = need_per_weight(up_tokens, train_tokens, char_vocab)
        reason += (f"; the next size up ({up[0]} × {up[2]}) would see {usable / block_weights(up):.2g} per weight in "
                   f"{up_tokens / train_tokens:.1f} passes, which does not pay off (it would need {need:g})")
    why.append(f"{n_layer} layer{'s' * (n_layer > 1)} × {n_embd} wide ({n_head} heads), block {block_size}, "
               f"batch {batch_size}: {reason}")
    if ngram:
        why.append("n-gram tables (the recipe's ngram_emb=3): a character vocabulary's 2- and 3-grams fit their rows, "
                   f"and {TABLE_PASSES} passes or fewer do not give them time to memorise")
    elif char_vocab:
        why.append(f"no n-gram tables: {passes:.0f} passes would let them memorise the data; without them a model "
                   f"improves up to ~{MAX_PASSES} passes")
    else:
        why.append("no n-gram tables: the n-grams of a token vocabulary overflow their rows and the tables memorise "
                   "(0.7 worse val loss on tiny Shakespeare in BPE tokens)")
    why.append("no dropout: in our CPU runs it cost half the tokens/s and did worse than stopping at those passes")
    return rung, seconds, iters, ngram, why


def unsure(speeds, chosen, train_tokens, budget, priority, char_vocab):
    """Whether the rules cannot tell the plan (chosen: rung, seconds, iters, ngram) from the recipe's own command
    (rung 0 with its n-gram tables for the whole budget): a character vocabulary on which the recipe would make
    more than TABLE_PASSES but at most UNSURE_PASSES passes, where the tables memorise on one machine and still pay
    on a faster one (tiny Shakespeare, 120 s: the recipe beat the plan at 8 passes, 1.579 to 1.672, and lost at 11,
    1.624 to 1.581; at 57 passes it lost by 0.58)."""
    rung, _, iters, ngram = chosen
    recipe_passes = speeds[0] * budget / train_tokens
    return (char_vocab and priority == "quality" and not (rung == 0 and ngram and iters is None)
            and TABLE_PASSES < recipe_passes <= UNSURE_PASSES)


def final_val_loss(run_dir):
    """The last val loss a finished run recorded in its metrics.csv (None when it recorded none)."""
    path = os.path.join(run_dir, "metrics.csv")
    losses = [r["val_loss"] for r in read_metrics(path) if r["val_loss"] is not None] if os.path.isfile(path) else []
    return losses[-1] if losses else None


def train(cmd):
    """Run train.py as printed, with this checkout's train.py and recipe; its exit status."""
    script, config, *rest = cmd
    return subprocess.call([sys.executable, os.path.join(HERE, script), os.path.join(HERE, config), *rest])


def command(rung, seconds, iters, ngram, device_name, run_dir):
    """train.py's arguments: config/shakespeare_char_cpu.py's recipe at this rung's shape, for `seconds` of training or,
    where a pass limit ends the run, `iters` iterations (the LR schedule then runs on iterations)."""
    n_layer, n_head, n_embd, block_size, batch_size = LADDER[rung]
    tables = [] if ngram else ["--ngram_emb=0"]  # config/shakespeare_char_cpu.py turns them on
    stop = [f"--max_time={round(seconds, 1):g}"] if iters is None else ["--max_time=0", f"--max_iters={iters}"]
    return ["train.py", "config/shakespeare_char_cpu.py", f"--dataset={dataset}", f"--out_dir={run_dir}",
            f"--device={device_name}", *stop, f"--n_layer={n_layer}", f"--n_head={n_head}",
            f"--n_embd={n_embd}", f"--block_size={block_size}", f"--batch_size={batch_size}",
            *tables, *shlex.split(train_args)]


if __name__ == "__main__":
    configure(globals())
    check(globals(), dict(max_time=ABOVE_ZERO))
    if priority not in ("quality", "speed"):
        die(f"--priority={priority!r} is not one of quality, speed")
    if compare not in ("auto", "always", "never"):
        die(f"--compare={compare!r} is not one of auto, always, never")
    data_dir = os.path.join("data", dataset)
    meta = read_meta(data_dir)
    if "chat_template" in meta:
        die(f"data/{dataset} is a conversation dataset; fine-tune on it with config/sft_pydocs.py (see the README), "
            f"the recommender plans pre-training runs")
    check_bins(data_dir, meta, LADDER[0][3], fix=f"the smallest shape reads windows of {LADDER[0][3] + 1} tokens: "
               f"give a larger corpus")  # train.py's checks, for the smallest shape's block
    train_tokens = os.path.getsize(os.path.join(data_dir, "train.bin")) // np.dtype(meta["dtype"]).itemsize
    device_name = pick_device(device)
    run_dir = out_dir or f"out-{dataset}-{max_time:g}s"
    taken = [d for d in (run_dir, run_dir + "-recipe")[:1 + (compare != "never")] for name in ("ckpt.pt", "ckpt")
             if os.path.exists(os.path.join(d, name))]  # (the recipe's run goes beside the plan's, to compare)
    if run and taken and "--overwrite=True" not in train_args:
        die(f"{taken[0]} already holds a run; pick another --out_dir, or pass --train_args=--overwrite=True")
    char_vocab = meta["vocab_size"] <= NGRAM_MAX_VOCAB
    speeds = []
    for shape in LADDER:  # measured smallest first; a rung that cannot pay off at this budget ends the ladder
        if shape[3] >= train_tokens:
            break
        tps = measure(shape, meta["vocab_size"], 3 if char_vocab else 0, device_name)
        speeds.append(tps)
        print(f"measured {shape[0]} × {shape[2]}, block {shape[3]}, batch {shape[4]}: "
              + (f"{tps:,.0f} tokens/s" if tps else "does not fit in memory"), file=sys.stderr)
        if not pays(tps, shape, train_tokens, max_time, char_vocab):
            break
    if not speeds[0]:
        die(f"even the smallest shape ({LADDER[0][0]} × {LADDER[0][2]}, batch {LADDER[0][4]}) does not fit in "
            f"{device_name}'s memory; free some, or try --device=cpu")
    rung, seconds, iters, ngram, why = plan(speeds, train_tokens, max_time, priority, char_vocab)
    cmd = command(rung, seconds, iters, ngram, device_name, run_dir)
    recipe = command(0, max_time, None, True, device_name, run_dir + "-recipe")  # config/shakespeare_char_cpu.py's
    cannot_tell = unsure(speeds, (rung, seconds, iters, ngram), train_tokens, max_time, priority, char_vocab)
    race = compare != "never" and (cannot_tell or compare == "always" and not (rung == 0 and ngram and iters is None))
    print("python " + " ".join(shlex.quote(a) for a in cmd))
    for line in why:
        print(f"  # {line}")
    if cannot_tell:
        print(f"  # but the recipe's own command makes {speeds[0] * max_time / train_tokens:.0f} passes with its "
              f"tables, where the rules cannot tell which does better on this machine; --run=True trains both:")
    if race:
        print("python " + " ".join(shlex.quote(a) for a in recipe))
    if run:
        status = train(cmd)
        if status or not race:
            sys.exit(status)
        status = train(recipe)
        if status:
            sys.exit(status)
        ours, theirs = final_val_loss(run_dir), final_val_loss(run_dir + "-recipe")
        if ours is None or theirs is None:
            die(f"no val loss in {run_dir if ours is None else run_dir + '-recipe'}/metrics.csv to compare")
        best = run_dir if ours <= theirs else run_dir + "-recipe"
        print(f"val loss: the plan {ours:.4f} ({run_dir}), the recipe {theirs:.4f} ({run_dir}-recipe): "
              f"keep {best}" + ("" if best == run_dir else " (the rules' plan did worse here)"))
