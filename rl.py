"""
Reinforcement learning with verifiable rewards (GRPO; nanochat's chat_rl.py is the model): each step draws several
completions of each prompt from the one engine (generate.py: a batch of samples, per-row positions, stopping at the
end of turn), scores them with a reward, and moves the model toward the completions that beat their group's mean
(group-relative advantages, token-level normalisation, on-policy, no KL penalty by default). Logs the mean reward,
held-out pass@1 (greedy) every eval_interval steps and tokens/s of the rollouts and of the update; checkpoints resume
exactly; --lora_rank trains adapters; Ctrl-C saves as train.py does.

    python rl.py --init_from=out-sft-arith --task=arithmetic              # the built-in task, offline
    python rl.py --init_from=hf:HuggingFaceTB/SmolLM2-135M-Instruct --task=prompts.jsonl --reward=reward.py
    python rl.py --init_from=resume --out_dir=out-rl                      # go on where it stopped

A prompts file is JSON Lines of {"messages": [...]} plus whatever the reward needs (e.g. "answer"); a reward file is
Python defining reward(prompt, completion, **fields) -> float. The built-in task: sums of two numbers made from the
seed, the reward 1 when the completion's last number is the sum.
"""

import os
import random
import re
import runpy
import sys
import time
from contextlib import nullcontext

import torch

from chat_templates import template_for
from checkpoint import build_model, load_checkpoint, load_source, resolve_checkpoint, save_checkpoint
from configurator import ABOVE_ZERO, NON_NEGATIVE, POSITIVE, SEED, check, configure, declare
from dataset import make_out_dir
from errors import die
from generate import generate
from hardware import pick_device
from lora import LORA_SETTINGS, adapters, adapters_off, attach, summary
from optimizers import lr_factor
from posttrain import adamw, frozen_copy, group_advantages, policy_loss, read_jsonl, token_logps
from sft import arithmetic
from tokenizer import check_tokenizer

# -----------------------------------------------------------------------------
init_from = ""  # the model: a run folder (an SFT run, say), hf:..., gguf:..., or resume (out_dir's checkpoint)
out_dir = "out-rl"  # ckpt.pt (with its optimizer and RNG state: resumable) and metrics.csv
overwrite = False  # replace a ckpt.pt already in out_dir (not with init_from=resume)
task = "arithmetic"  # arithmetic (built in, offline) | gsm8k (downloaded once) | FILE.jsonl of {"messages": [...]}
reward = ""  # a Python file defining reward(prompt, completion, **fields) -> float; '' = the task's own
eval_prompts = 64  # prompts held out for pass@1 (arithmetic: the same for every seed, never trained on)
num_samples = 8  # completions per prompt: the group its advantages are relative to
prompts_per_step = 4  # prompts per step (so num_samples * prompts_per_step rollouts)
max_new_tokens = 24  # the longest completion
temperature = 1.0  # rollouts' sampling temperature
top_k = 0  # rollouts' top-k (0 = all tokens)
learning_rate = 1e-5  # AdamW's peak (with LoRA ~10-100x more)
min_lr = 1e-6  # the end of the cosine decay
warmup_iters = 0  # linear warmup steps
max_iters = 60  # steps
weight_decay = 0.0  # AdamW weight decay on matrices
grad_clip = 1.0  # clip the gradient norm to this; 0 = off
kl_coef = 0.0  # > 0: penalise KL to the starting model (the base with LoRA), as k3 per token; 0 as nanochat
eval_interval = 10  # held-out pass@1 (greedy) and a checkpoint every this many steps
device = ""  # cpu | cuda | mps; '' picks cuda > mps > cpu
seed = 1337  # the task, the order of the prompts, the rollouts' sampling
lora_rules = declare(globals(), LORA_SETTINGS)  # --lora_rank=16: adapters on the frozen model
# -----------------------------------------------------------------------------
NUMBER = re.compile(r"-?\d+")


def gsm8k(split):
    """GSM8K's word problems (the harness's dataset, openai/gsm8k, downloaded once into the datasets cache) as prompts
    with their final answers."""
    try:
        from datasets import load_dataset
    except ImportError:
        die("--task=gsm8k needs the datasets package: pip install datasets")
    try:
        data = load_dataset("openai/gsm8k", "main", split=split)
    except Exception as e:  # offline with nothing cached, no such dataset
        die(f"could not get GSM8K ({type(e).__name__}); go online once (it is cached), or give --task=FILE.jsonl")
    return [dict(messages=[dict(role="user", content=row["question"])], answer=row["answer"].split("####")[-1].strip()
                 .replace(",", "")) for row in data]


def last_number_is_answer(prompt, completion, answer, **_):
    """The built-in tasks' reward (GSM8K's, the sums'): 1.0 when the completion's last number is the answer."""
    found = NUMBER.findall(completion.replace(",", ""))
    return float(bool(found) and found[-1] == str(answer))


def load_task(config):
    """(training prompts, held-out prompts, reward function) of the settings."""
    if config["task"] == "gsm8k":
        rows, held, score = gsm8k("train"), gsm8k("test")[:config["eval_prompts"]], last_number_is_answer
    elif config["task"] == "arithmetic":
        rows, held, score = arithmetic(2000, config["seed"]), arithmetic(config["eval_prompts"], 0, held_out=True), \
            last_number_is_answer
    else:
        if not os.path.isfile(config["task"]):
            die(f"--task={config['task']} is neither arithmetic, gsm8k nor a JSON Lines file of prompts")
        rows = [row for _, row in read_jsonl(config["task"], '{"messages": [...], ...the reward\'s fields}')]
        if any(not isinstance(r.get("messages"), list) for r in rows):
            die(f"{config['task']}: every line needs a messages list (the prompt), beside the reward's fields")
        random.Random(config["seed"]).shuffle(rows)
        cut = min(config["eval_prompts"], len(rows) // 5)
        rows, held, score = rows[cut:], rows[:cut], None
    if config["reward"]:
        if not os.path.isfile(config["reward"]):
            die(f"--reward={config['reward']} not found; give a Python file defining reward(prompt, completion, ...)")
        score = runpy.run_path(config["reward"]).get("reward")
        if not callable(score):
            die(f"{config['reward']} defines no reward(prompt, completion, **fields) function")
    if score is None:
        die(f"--task={config['task']} needs --reward=FILE.py (a reward(prompt, completion, **fields) -> float)")
    return rows, held, score


def scored(score, row, prompt_text, completion):
    """The reward of one completion, or one line naming the prompt (its last message) when the reward raises or is
    not a number."""
    fields = {k: v for k, v in row.items() if k != "messages"}
    name = str(row["messages"][-1].get("content", ""))[:80]
    try:
        value = score(prompt_text, completion, **fields)
    except Exception as e:
        die(f"the reward raised {type(e).__name__} ({str(e)[:120]}) on the prompt {name!r}; fix the reward file")
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value:
        die(f"the reward returned {value!r}, not a number, on the prompt {name!r}; return a float")
    return float(value)


def rollouts(model, template, tok, rows, config, generator, greedy=False):
    """(rows of (prompt ids, completion ids), rewards (N,), tokens generated) for each prompt's group of samples
    (one greedy sample each when greedy)."""
    group = 1 if greedy else config["num_samples"]
    room = model.config.block_size - config["max_new_tokens"]
    prompts = [template.encode(r["messages"], add_generation_prompt=True)[-room:] for r in rows]
    model.eval()
    outs = generate(model, [p for p in prompts for _ in range(group)], config["max_new_tokens"],
                    stop_ids=template.stop_ids, generator=generator, top_k=config["top_k"] or None,
                    temperature=0.0 if greedy else config["temperature"])
    model.train()
    pairs, rewards = [], []
    for i, out in enumerate(outs):
        row, prompt = rows[i // group], prompts[i // group]
        text = tok.decode([t for t in out if t not in template.stop_ids])
        rewards.append(scored(config["score"], row, tok.decode(prompt), text))
        pairs.append((prompt, out))
    return pairs, torch.tensor(rewards), sum(len(o) for o in outs)


def setup(config, dev):
    """(model, template, tokenizer, LoRA record, saved run state or None): a new run from init_from, or a resumed
    one (its base reloaded and its adapters, or its weights, put back)."""
    resume = config["init_from"] == "resume"
    record = load_source(resolve_checkpoint(config["out_dir"]) if resume else config["init_from"], merge=not resume)
    if resume and not record.state:
        die(f"{config['out_dir']} holds no RL run to resume; start one with --init_from=MODEL")
    try:
        tok = check_tokenizer(record.meta or {})
    except ValueError as e:
        die(f"{config['init_from']} carries no usable tokenizer ({e}); RL renders prompts in its chat template")
    model = build_model(record, dev)
    info = None
    if config["lora_rank"]:
        info = {k: v for k, v in record.lora.items() if k != "adapters"} if resume else summary(config, record.model)
        print(f"LoRA: {attach(model, config):,} trainable parameters")
        if resume:
            model.load_state_dict(record.lora["adapters"], strict=False)
    return model, template_for(record.meta, tok), tok, info, record.meta, record.state if resume else None


def update(model, reference, pairs, advantages, opt, params, config, dev):
    """One on-policy policy-gradient step on the rollouts; returns the loss."""
    logps, mask = token_logps(model, pairs, dev)
    ref = None
    if config["kl_coef"]:
        with torch.no_grad(), (adapters_off(model) if reference is None else nullcontext()):
            ref = token_logps(reference or model, pairs, dev)[0]
    loss = policy_loss(logps, mask, advantages.to(dev), ref, config["kl_coef"])
    loss.backward()
    if config["grad_clip"]:
        torch.nn.utils.clip_grad_norm_(params, config["grad_clip"])
    opt.step()
    opt.zero_grad(set_to_none=True)
    return loss.item()


def main():
    config, explicit = configure(globals())
    if config["init_from"] == "resume":  # the run goes on as it was: its settings, unless given now
        path = resolve_checkpoint(config["out_dir"])
        saved = load_checkpoint(path).get("config") if os.path.isfile(path) else None
        if not saved:
            die(f"{config['out_dir']} holds no RL run to resume; start one with --init_from=MODEL")
        config.update({k: v for k, v in saved.items() if k in config and k not in explicit | {"init_from", "out_dir"}})
        globals().update(config)
    check(config, dict(eval_prompts=POSITIVE, num_samples=(lambda v: v >= 2, ">= 2 (a group to compare within)"),
                       prompts_per_step=POSITIVE, max_new_tokens=POSITIVE, temperature=ABOVE_ZERO, top_k=NON_NEGATIVE,
                       learning_rate=NON_NEGATIVE, min_lr=NON_NEGATIVE, warmup_iters=NON_NEGATIVE, max_iters=POSITIVE,
                       weight_decay=NON_NEGATIVE, grad_clip=NON_NEGATIVE, kl_coef=NON_NEGATIVE,
                       eval_interval=POSITIVE, seed=SEED) | lora_rules)
    if not init_from:
        die("give --init_from=MODEL (a chat model to improve), or --init_from=resume")
    if init_from != "resume" and os.path.exists(os.path.join(out_dir, "ckpt.pt")) and not overwrite:
        die(f"{out_dir}/ckpt.pt already exists; resume it with --init_from=resume, or pick another --out_dir")
    rows, held, config["score"] = load_task(config)
    dev = pick_device(device)
    torch.manual_seed(seed)
    model, template, tok, info, meta, state = setup(config, dev)
    for row in rows + held:  # every prompt renders in the model's template and vocabulary, or one line
        try:
            template.encode(row["messages"], add_generation_prompt=True)
        except ValueError as e:
            die(f"the prompt {str(row['messages'][-1].get('content', ''))[:80]!r} does not encode for this model ({e})")
    reference = None if config["lora_rank"] or not kl_coef else frozen_copy(model)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = adamw(params, learning_rate, weight_decay)
    generator = torch.Generator(device=dev).manual_seed(seed)
    start, elapsed = 0, 0.0
    if state:
        opt.load_state_dict(state["optimizers"][0])
        generator.set_state(state["rng"]["generator"])
        torch.set_rng_state(state["rng"]["torch"])
        start, elapsed = state["iter_num"], state.get("elapsed", 0.0)
    make_out_dir(out_dir)  # every check is done: from here files are written
    fields = dict(model_config=vars(model.config), meta=meta, lora=info)
    run_loop(model, reference, template, tok, rows, held, opt, params, generator, (start, elapsed), config, dev,
             fields)


def save(model, opt, generator, it, elapsed, config, fields):
    """out_dir/ckpt.pt: the weights (or adapters), the optimizer and RNG states and the step: a resumable run every
    script also loads."""
    weights = adapters(model) if config["lora_rank"] else model.state_dict()
    plain = {k: v for k, v in config.items() if k != "score"}
    save_checkpoint(dict(fields, model=weights, config=plain, iter_num=it, elapsed=elapsed,
                         optimizers=[opt.state_dict()],
                         rng=dict(torch=torch.get_rng_state(), generator=generator.get_state())),
                    os.path.join(config["out_dir"], "ckpt.pt"))


def run_loop(model, reference, template, tok, rows, held, opt, params, generator, begin, config, dev, fields):
    """The steps: rollouts, rewards, advantages, the update; pass@1 and a checkpoint every eval_interval steps; a log
    line and a metrics.csv row per step (elapsed_s: the run's seconds so far). Ctrl-C saves the step reached and
    exits 130."""
    schedule = dict(config, decay_lr=True, lr_decay_iters=0, max_time=0, lr_schedule="cosine")
    (start, elapsed), t_start = begin, time.time()
    clock = lambda: elapsed + time.time() - t_start  # noqa: E731 (seconds of this run, a resumed one's included)
    metrics = open(os.path.join(config["out_dir"], "metrics.csv"), "a" if start else "w", encoding="utf-8")
    if not start:
        metrics.write("iter,elapsed_s,reward,pass1,loss,rollout_tok_per_s,update_tok_per_s\n")
    it, per_step = start, config["prompts_per_step"]
    try:
        for it in range(start, config["max_iters"] + 1):
            if it % config["eval_interval"] == 0 or it == config["max_iters"]:
                _, greedy, _ = rollouts(model, template, tok, held, config, generator, greedy=True)
                print(f"step {it}: held-out pass@1 {greedy.mean().item():.3f}")
                metrics.write(f"{it},{clock():.1f},,{greedy.mean().item():.4f},,,\n")
                if it > start:
                    save(model, opt, generator, it, clock(), config, fields)
            if it == config["max_iters"]:
                break
            for group in opt.param_groups:
                group["lr"] = config["learning_rate"] * lr_factor(it, 0.0, schedule)
            batch = [rows[(it * per_step + i) % len(rows)] for i in range(per_step)]
            t0 = time.time()
            pairs, rewards, n_tokens = rollouts(model, template, tok, batch, config, generator)
            t1 = time.time()
            loss = update(model, reference, pairs, group_advantages(rewards, config["num_samples"]), opt, params,
                          config, dev)
            t2 = time.time()
            print(f"iter {it + 1}: reward {rewards.mean().item():.3f}, loss {loss:.4f}, rollouts "
                  f"{n_tokens / (t1 - t0):,.0f} tok/s, update {n_tokens / (t2 - t1):,.0f} tok/s")
            metrics.write(f"{it + 1},{clock():.1f},{rewards.mean().item():.4f},,{loss:.6g},{n_tokens / (t1 - t0):.1f},"
                          f"{n_tokens / (t2 - t1):.1f}\n")
            metrics.flush()
    except KeyboardInterrupt:
        save(model, opt, generator, it, clock(), config, fields)
        print(f"stopped at iter {it}; resume with --init_from=resume --out_dir={config['out_dir']}", file=sys.stderr)
        sys.exit(130)
    finally:
        metrics.close()
    print(f"done: {config['max_iters']} steps; {config['out_dir']}/ckpt.pt loads in chat.py and resumes here")


if __name__ == "__main__":
    main()
