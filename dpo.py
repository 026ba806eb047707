"""
Preference tuning with DPO (Rafailov et al., 2023): a chat model (a run of ours, an SFT run say, or any source) learns
to prefer each pair's chosen completion over its rejected one, measured against a frozen reference, the starting model
(with LoRA: the base with its adapters switched off, so no second copy is held). Pairs are JSON Lines in TRL's shape
(prompt + chosen + rejected, strings or lists of messages), rendered in the model's own chat template. Its own script,
not a loss of train.py's loop: its batches are pairs of completions after a prompt, not windows of the token bins,
and it holds a reference; the parts are shared (posttrain.py, lora.py, the checkpoint, the LR schedule).

    python dpo.py --init_from=out-sft-pydocs --data=pairs.jsonl --out_dir=out-dpo
    python dpo.py --init_from=hf:HuggingFaceTB/SmolLM2-135M-Instruct --data=pairs.jsonl --lora_rank=16
    python dpo.py --init_from=hf:HuggingFaceTB/SmolLM2-135M-Instruct --data=arithmetic --lora_rank=16  # built in
    python chat.py --out_dir=out-dpo
"""

import csv
import os
import sys
import time
from contextlib import nullcontext

import torch

from chat_templates import template_for
from checkpoint import build_model, load_source, save_checkpoint
from configurator import ABOVE_ZERO, FRACTION, NON_NEGATIVE, POSITIVE, SEED, check, configure, declare
from dataset import make_out_dir
from errors import die
from hardware import pick_device
from lora import LORA_SETTINGS, adapters, adapters_off, attach, summary
from optimizers import lr_factor
from posttrain import adamw, completion_logps, dpo_loss, frozen_copy, read_pairs
from tokenizer import check_tokenizer

# -----------------------------------------------------------------------------
init_from = ""  # the model to tune: a run folder (an SFT run, say), gpt2*, hf:ORG/NAME, gguf:FILE
data = ""  # preference pairs, JSON Lines of {"prompt": ..., "chosen": ..., "rejected": ...}; arithmetic: built in
out_dir = "out-dpo"  # ckpt.pt (the model, or the adapters with --lora_rank) and metrics.csv go here
overwrite = False  # replace a ckpt.pt already in out_dir
val_fraction = 0.1  # pairs held out: their accuracy (chosen rewarded over rejected) is logged at each evaluation
beta = 0.1  # how far from the reference the policy may go (the rewards' scale): TRL's default
label_smoothing = 0.0  # the chance a pair's labels are flipped (cDPO, for noisy preferences); 0 = plain DPO
learning_rate = 5e-6  # AdamW's peak; DPO wants small steps (with LoRA ~10x more)
min_lr = 5e-7  # the end of the cosine decay
warmup_iters = 10  # linear warmup steps
max_iters = 100  # optimizer steps
batch_size = 4  # pairs per micro-step
gradient_accumulation_steps = 1  # micro-steps per optimizer step
weight_decay = 0.0  # AdamW weight decay on the matrices
grad_clip = 1.0  # clip the gradient norm to this; 0 = off
block_size = 512  # longest prompt + completion (prompts are cut from the left to fit)
eval_interval = 20  # evaluate on the held-out pairs (and save) every this many steps
log_interval = 1  # print a log line every this many steps
device = ""  # cpu | cuda | mps; '' picks cuda > mps > cpu
seed = 1337  # the split, the order of the pairs and the adapters' init
lora_rules = declare(globals(), LORA_SETTINGS)  # --lora_rank=16: adapters on the frozen model, its reference
# -----------------------------------------------------------------------------


def evaluate(model, reference, pairs, config, dev):
    """(loss, accuracy, mean reward margin, the share of pairs whose chosen completion the model itself finds more
    likely) on the held-out pairs."""
    losses, wins, margins, prefers = [], [], [], []
    model.eval()
    with torch.no_grad():
        for start in range(0, len(pairs), config["batch_size"]):
            loss, chosen, rejected, prefer = step_loss(model, reference, pairs[start:start + config["batch_size"]],
                                                       config, dev)
            losses.append(loss.item())
            wins += (chosen > rejected).tolist()
            margins += (chosen - rejected).tolist()
            prefers += prefer.tolist()
    model.train()
    return [sum(v) / len(v) for v in (losses, wins, margins, prefers)]


def step_loss(model, reference, batch, config, dev):
    """DPO's loss on a batch of pairs, its rewards of the chosen and the rejected completions, and whether the model
    finds each chosen completion more likely than the rejected one."""
    chosen, rejected = completion_logps(model, batch, dev)
    with torch.no_grad(), (adapters_off(model) if reference is None else nullcontext()):
        ref_chosen, ref_rejected = completion_logps(reference or model, batch, dev)
    return *dpo_loss(chosen, rejected, ref_chosen, ref_rejected, config["beta"], config["label_smoothing"]), \
        chosen.detach() > rejected.detach()


def save(model, record_fields, iter_num, config):
    """out_dir/ckpt.pt: a run every script loads (with LoRA: the adapters, merged into the base at load)."""
    weights = adapters(model) if config["lora_rank"] else model.state_dict()
    save_checkpoint(dict(record_fields, model=weights, config=config, iter_num=iter_num),
                    os.path.join(config["out_dir"], "ckpt.pt"))


def main():
    config, _ = configure(globals())
    check(config, dict(val_fraction=FRACTION, beta=ABOVE_ZERO, label_smoothing=(lambda v: 0 <= v < 0.5, "in [0, 0.5)"),
                       learning_rate=NON_NEGATIVE, min_lr=NON_NEGATIVE, warmup_iters=NON_NEGATIVE, max_iters=POSITIVE,
                       batch_size=POSITIVE, gradient_accumulation_steps=POSITIVE, weight_decay=NON_NEGATIVE,
                       grad_clip=NON_NEGATIVE, block_size=POSITIVE, eval_interval=POSITIVE, log_interval=POSITIVE,
                       seed=SEED) | lora_rules)
    if not init_from or not data:
        die("give --init_from=MODEL (the model to tune) and --data=FILE.jsonl (preference pairs)")
    if data != "arithmetic" and not os.path.isfile(data):
        die(f"--data={data} not found; give a JSON Lines file of prompt/chosen/rejected pairs")
    if os.path.exists(os.path.join(out_dir, "ckpt.pt")) and not overwrite:
        die(f"{out_dir}/ckpt.pt already exists; pick another --out_dir or pass --overwrite=True")
    dev = pick_device(device)
    torch.manual_seed(seed)
    record = load_source(init_from)
    try:
        tokenizer = check_tokenizer(record.meta or {})
    except ValueError as e:
        die(f"{init_from} carries no usable tokenizer ({e}); DPO renders the pairs in the model's chat template")
    template = template_for(record.meta, tokenizer)
    model = build_model(record, dev)
    pairs = read_pairs(data, template, min(block_size, model.config.block_size), seed)
    order = torch.randperm(len(pairs), generator=torch.Generator().manual_seed(seed)).tolist()
    held = max(1, int(len(pairs) * val_fraction))
    val, train = [pairs[i] for i in order[:held]], [pairs[i] for i in order[held:]]
    make_out_dir(out_dir)  # every check is done: from here files are written
    fields = dict(model_config=vars(model.config), meta=record.meta, lora=None)
    reference = None
    if config["lora_rank"]:
        fields["lora"] = summary(config, record.model)
        print(f"LoRA: {attach(model, config):,} trainable parameters; the reference is the base, adapters off")
    else:
        reference = frozen_copy(model)
    del record
    params = [p for p in model.parameters() if p.requires_grad]
    opt = adamw(params, learning_rate, weight_decay)
    print(f"{len(train)} pairs to train on, {len(val)} held out; beta {beta}, {max_iters} steps of "
          f"{batch_size * gradient_accumulation_steps} pairs")
    schedule = dict(config, decay_lr=True, lr_decay_iters=0, max_time=0, lr_schedule="cosine")
    with open(os.path.join(out_dir, "metrics.csv"), "w", newline="", encoding="utf-8") as f:
        log = csv.writer(f)
        log.writerow(["iter", "loss", "accuracy", "margin", "val_loss", "val_accuracy", "val_margin", "val_prefers",
                      "ms_per_iter"])
        train_loop(model, reference, train, val, opt, params, schedule, config, dev, fields, log)


def train_loop(model, reference, train, val, opt, params, schedule, config, dev, fields, log):
    """The steps, with evaluations, logging and saves; Ctrl-C saves the step reached and exits 130."""
    cursor, it = 0, 0
    try:
        for it in range(config["max_iters"] + 1):
            if it % config["eval_interval"] == 0 or it == config["max_iters"]:
                loss, acc, margin, prefers = evaluate(model, reference, val, config, dev)
                print(f"step {it}: held-out loss {loss:.4f}, accuracy {acc:.3f}, reward margin {margin:.4f}, "
                      f"the chosen more likely in {prefers:.3f}")
                log.writerow([it, "", "", "", f"{loss:.6g}", f"{acc:.4g}", f"{margin:.6g}", f"{prefers:.4g}", ""])
                if it:
                    save(model, fields, it, config)
            if it == config["max_iters"]:
                break
            t0 = time.time()
            for group in opt.param_groups:
                group["lr"] = config["learning_rate"] * lr_factor(it, 0.0, schedule)
            total, wins, margins = 0.0, [], []
            for _ in range(config["gradient_accumulation_steps"]):
                batch = [train[(cursor + i) % len(train)] for i in range(config["batch_size"])]
                cursor += config["batch_size"]
                loss, chosen, rejected, _ = step_loss(model, reference, batch, config, dev)
                (loss / config["gradient_accumulation_steps"]).backward()
                total += loss.item() / config["gradient_accumulation_steps"]
                wins += (chosen > rejected).tolist()
                margins += (chosen - rejected).tolist()
            if config["grad_clip"]:
                torch.nn.utils.clip_grad_norm_(params, config["grad_clip"])
            opt.step()
            opt.zero_grad(set_to_none=True)
            ms = (time.time() - t0) * 1000
            acc, margin = sum(wins) / len(wins), sum(margins) / len(margins)
            log.writerow([it + 1, f"{total:.6g}", f"{acc:.4g}", f"{margin:.6g}", "", "", "", "", f"{ms:.1f}"])
            if (it + 1) % config["log_interval"] == 0:
                print(f"iter {it + 1}: loss {total:.4f}, accuracy {acc:.3f}, reward margin {margin:.4f}, "
                      f"{ms:.0f} ms")
    except KeyboardInterrupt:
        save(model, fields, it, config)
        print(f"stopped at iter {it}; the model so far is in {config['out_dir']}/ckpt.pt", file=sys.stderr)
        sys.exit(130)
    print(f"done: {config['max_iters']} steps; {config['out_dir']}/ckpt.pt loads in chat.py, sample.py, serve.py")


if __name__ == "__main__":
    main()
