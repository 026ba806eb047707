"""
Post-training's parts, for dpo.py and rl.py: preference pairs as JSON Lines in TRL's shape (`prompt` + `chosen` +
`rejected`, each a string or a list of messages) rendered in the model's chat template so that only the completions
count; the log-probability of each completion token after its prompt; the sigmoid DPO loss (Rafailov et al., 2023)
with β and label smoothing (cDPO) and its implicit rewards; and GRPO's group-relative advantages and token-level
policy-gradient loss (with an optional KL penalty to a reference). Not run by itself.
"""

import copy
import json
import random

import torch
import torch.nn.functional as F

from errors import die
from sft import arithmetic


def messages(value, role, where):
    """A prompt or a completion as a list of messages: a string is one message of `role`."""
    if isinstance(value, str):
        return [dict(role=role, content=value)]
    if isinstance(value, list) and value and all(isinstance(m, dict) and isinstance(m.get("content"), str)
                                                 and m.get("role") in ("system", "user", "assistant") for m in value):
        return value
    die(f"{where}: a prompt, chosen or rejected field must be a string or a list of {{role, content}} messages")


def encode_pair(template, row, block_size, where):
    """(prompt ids, chosen completion ids, rejected completion ids) of one pair, each completion as the template
    renders it after the prompt (its end of turn included); a prompt cut from the left so that prompt + the longer
    completion fit block_size + 1 tokens."""
    if not all(k in row for k in ("prompt", "chosen", "rejected")):
        die(f"{where}: a pair needs prompt, chosen and rejected fields (TRL's preference format)")
    prompt = messages(row["prompt"], "user", where)
    try:
        prompt_ids = template.encode(prompt, add_generation_prompt=True)
        fulls = [template.encode(prompt + messages(row[key], "assistant", where)) for key in ("chosen", "rejected")]
    except ValueError as e:  # characters a character vocabulary lacks, a template that refuses the conversation
        die(f"{where}: {e}")
    completions = []
    for key, full in zip(("chosen", "rejected"), fulls, strict=True):
        if full[:len(prompt_ids)] != prompt_ids:
            die(f"{where}: the chat template does not render the {key} reply after the prompt as generation would "
                f"start it; give completions as one assistant message")
        completions.append(full[len(prompt_ids):][:block_size])
    keep = block_size + 1 - max(map(len, completions))
    return (prompt_ids[-keep:] if keep > 0 else prompt_ids[-1:]), *completions


def arithmetic_pairs(n, seed):
    """n preference pairs on the sums (dpo.py's built-in data): the right sum chosen, a near miss rejected."""
    r = random.Random(seed + 1)
    pairs = []
    for row in arithmetic(n, seed):
        question, right = row["reply"].rpartition(" = ")[0], int(row["answer"])
        wrong = right + r.choice([-10, -2, -1, 1, 2, 10])
        pairs.append(dict(prompt=row["messages"], chosen=row["reply"], rejected=f"{question} = {wrong}"))
    return pairs


def read_jsonl(path, what):
    """[(line number, object)] of a JSON Lines file; one line for a file that cannot be read or a line that is not
    a JSON object (what: the shape a line should have, for the message)."""
    try:
        with open(path, encoding="utf-8") as f:
            lines = [(n, line) for n, line in enumerate(f, 1) if line.strip()]
    except OSError as e:
        die(f"cannot read {path} ({e.strerror}); give a JSON Lines file of {what}")
    rows = []
    for n, line in lines:
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            row = None
        if not isinstance(row, dict):
            die(f"{path} line {n} is not a JSON object; each line is one of {what}")
        rows.append((n, row))
    return rows


def read_pairs(path, template, block_size, seed=0):
    """Every pair of a JSON Lines file, encoded (encode_pair); path "arithmetic": 1,000 pairs on the sums."""
    what = '{"prompt": ..., "chosen": ..., "rejected": ...}'
    rows = enumerate(arithmetic_pairs(1000, seed), 1) if path == "arithmetic" else read_jsonl(path, what)
    pairs = [encode_pair(template, row, block_size, f"{path} line {n}") for n, row in rows]
    if len(pairs) < 2:
        die(f"{path} holds {len(pairs)} pair(s); DPO needs a few to train on and to hold out")
    return pairs


def token_logps(model, rows, device):
    """(log-probability of each completion token after its prompt, mask): (N, T) each, for rows of (prompt ids,
    completion ids), from one right-padded forward; 0 where the mask is 0 (the prompt, the padding)."""
    width = max(len(p) + len(c) for p, c in rows) - 1
    x = torch.zeros(len(rows), width, dtype=torch.long)
    y = torch.full((len(rows), width), -1, dtype=torch.long)  # -1: not a completion token
    for b, (p, c) in enumerate(rows):
        ids = torch.tensor(p + c)
        x[b, :len(ids) - 1] = ids[:-1]
        y[b, len(p) - 1:len(ids) - 1] = ids[len(p):]
    x, y = x.to(device), y.to(device)
    logits = model(x, torch.zeros_like(x))[0].float()  # (N, T, vocab)
    mask = (y >= 0).float()
    return logits.log_softmax(-1).gather(-1, y.clamp(min=0)[..., None])[..., 0] * mask, mask


def completion_logps(model, pairs, device):
    """The summed log-probability of each pair's chosen and of its rejected completion after its prompt: two tensors
    (B,), from one forward over the 2B sequences."""
    rows = [(p, c) for p, c, _ in pairs] + [(p, r) for p, _, r in pairs]
    return token_logps(model, rows, device)[0].sum(-1).chunk(2)


def dpo_loss(chosen, rejected, ref_chosen, ref_rejected, beta, label_smoothing=0.0):
    """The sigmoid DPO loss over a batch (mean), and each pair's implicit rewards β·(log π − log π_ref) of the chosen
    and the rejected completion; label_smoothing ε: the pair's labels taken as flipped with probability ε (cDPO)."""
    chosen_rewards, rejected_rewards = beta * (chosen - ref_chosen), beta * (rejected - ref_rejected)
    margin = chosen_rewards - rejected_rewards
    loss = -F.logsigmoid(margin) * (1 - label_smoothing) - F.logsigmoid(-margin) * label_smoothing
    return loss.mean(), chosen_rewards.detach(), rejected_rewards.detach()


def group_advantages(rewards, group):
    """GRPO's advantages: each completion's reward less its group's mean (the completions of one prompt), over the
    group's standard deviation; 0 for a group whose completions all scored alike (nothing to learn from it)."""
    r = rewards.view(-1, group)
    std = r.std(dim=1, keepdim=True)
    return ((r - r.mean(dim=1, keepdim=True)) / std.clamp(min=1e-4) * (std > 0)).view(-1)


def policy_loss(logps, mask, advantages, ref_logps=None, kl_coef=0.0):
    """The policy-gradient loss of one on-policy step, token-level (DAPO's normalisation, nanochat's too): -A·log π of
    every completion token, averaged over all the batch's completion tokens, so a long completion weighs by its
    tokens; with kl_coef, plus kl_coef times the k3 estimate of KL(π || reference) per token (exp(d) - d - 1, d =
    log π_ref - log π)."""
    per_token = -advantages[:, None] * logps
    if kl_coef:
        d = ref_logps - logps
        per_token = per_token + kl_coef * (d.exp() - d - 1)
    return (per_token * mask).sum() / mask.sum().clamp(min=1)


def frozen_copy(model):
    """The reference a run is measured against: the starting model, copied and frozen (without LoRA)."""
    return copy.deepcopy(model).requires_grad_(False).eval()


def adamw(params, learning_rate, weight_decay):
    """AdamW over the trainable parameters, weight decay on the matrices only (as train.py's groups)."""
    return torch.optim.AdamW([dict(params=[p for p in params if p.dim() >= 2], weight_decay=weight_decay),
                              dict(params=[p for p in params if p.dim() < 2], weight_decay=0.0)], lr=learning_rate)
