"""
Conversations for supervised fine-tuning (SFT): JSON Lines in (a file, or a folder of them), each rendered with the
model's chat template (chat_templates.py, the same rendering as at inference, so in chat the model sees exactly
what it was trained on) into token bins with a per-token loss mask; and the built-in corpora: pydocs_chat
(questions about Python answered with its reference docs' words) and arithmetic (worked sums, the RL recipe's first
stage). Not run by itself.

    python prepare_bpe.py --input=pydocs_chat && python train.py config/sft_pydocs.py
    python chat.py --out_dir=out-sft-pydocs
    python prepare_char.py --input=arithmetic && python train.py config/sft_arith.py
"""

import json
import os
import random
from pathlib import Path

import numpy as np

from chat_templates import ROLES
from dataset import token_dtype, write_dataset
from errors import die


def is_chat_input(spec):
    return spec in ("pydocs_chat", "arithmetic") or spec.endswith(".jsonl") or (
        os.path.isdir(spec) and any(f.endswith(".jsonl") for f in os.listdir(spec)))


def read_conversations(spec):
    """(name, source, conversations) for --input: each conversation a checked list of {role, content} messages."""
    if spec == "pydocs_chat":
        return "pydocs_chat", "pydoc_data.topics as questions and answers", pydocs_chat()
    if spec == "arithmetic":  # rl.py's task, answered: "What is 12 + 34?" -> "12 + 34 = 46"
        return "arithmetic", "sums of two numbers below 100", [
            r["messages"] + [dict(role="assistant", content=r["reply"])] for r in arithmetic(5000, 0)]
    if os.path.isdir(spec):
        files = sorted(Path(spec).glob("*.jsonl"))
    elif os.path.isfile(spec):
        files = [Path(spec)]
    else:
        die(f"--input={spec!r} is not pydocs_chat, arithmetic, a .jsonl file or a folder of them")
    conversations = []
    for path in files:
        try:
            lines = path.read_text(encoding="utf-8").splitlines()
        except UnicodeDecodeError as e:
            die(f"{path} is not UTF-8 text (bad byte at offset {e.start}); convert it, e.g. `iconv -t utf-8`")
        for n, line in enumerate(lines, 1):
            if line.strip():
                try:
                    record = json.loads(line)
                except ValueError as e:
                    die(f'{path}:{n} is not JSON ({e}); each line holds one conversation: {{"messages": [...]}}')
                conversations.append(check_conversation(record, f"{path}:{n}"))
    if len(conversations) < 2:
        die(f"--input={spec} holds {len(conversations)} conversation(s); give at least two (one for validation)")
    name = Path(spec).stem if os.path.isfile(spec) else Path(spec).resolve().name
    return name, str(Path(spec).resolve()), conversations


def check_conversation(record, where):
    messages = record.get("messages") if isinstance(record, dict) else None
    if not isinstance(messages, list) or not messages:
        die(f'{where}: expected {{"messages": [{{"role": "user", "content": "..."}}, ...]}}')
    for m in messages:
        if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
            die(f"{where}: every message needs a role (system, user or assistant) and a string content, "
                f"not {str(m)[:80]}")
    if not any(m["role"] == "assistant" for m in messages):
        die(f"{where}: no assistant message, so nothing to learn from")
    return [dict(role=m["role"], content=m["content"]) for m in messages]


def write_chat_dataset(out_dir, conversations, tokenizer, template, meta, val_fraction, split, seed):
    """train/val .bin token ids, _mask.bin (uint8 loss mask) and _starts.bin (int64 offset of each conversation),
    then meta.json with the template (a Template). Whole conversations go to validation: the last ones, or a seeded
    choice. Each conversation is rendered and masked as chat.py renders it."""
    n_val = max(1, round(len(conversations) * val_fraction))
    order = range(len(conversations))
    val_set = set(order[-n_val:]) if split == "tail" else set(random.Random(seed).sample(order, n_val))
    parts = {s: ([], [], []) for s in ("train", "val")}  # ids, mask, starts
    for i, conversation in enumerate(conversations):
        ids, mask, starts = parts["val" if i in val_set else "train"]
        starts.append(len(ids))
        try:
            conversation_ids, conversation_mask = template.encode_masked(conversation)
        except ValueError as e:
            die(f"conversation {i + 1}: {e}")
        ids += conversation_ids
        mask += conversation_mask
    dtype = token_dtype(tokenizer.vocab_size)
    meta.update(**template.meta(), vocab_size=tokenizer.vocab_size, dtype=dtype,
                conversations=len(conversations), val_conversations=n_val, split=split, val_fraction=val_fraction,
                seed=seed,
                train_tokens=len(parts["train"][0]), val_tokens=len(parts["val"][0]),
                train_masked=int(sum(parts["train"][1])), val_masked=int(sum(parts["val"][1])))
    write_dataset(out_dir, {name: np.array(values, dtype=kind) for s, (ids, mask, starts) in parts.items()
                            for name, values, kind in ((f"{s}.bin", ids, dtype), (f"{s}_mask.bin", mask, np.uint8),
                                                       (f"{s}_starts.bin", starts, np.int64))}, meta)
    print(f"{len(conversations):,} conversations ({n_val:,} for validation), "
          f"{meta['train_tokens']:,} + {meta['val_tokens']:,} "
          f"tokens, {meta['train_masked']:,} + {meta['val_masked']:,} of them the assistant's (in the loss)")
    print(f"wrote {out_dir}/train.bin, val.bin, *_mask.bin, *_starts.bin, meta.json ({template.name} template); "
          f"train with --dataset={os.path.basename(os.path.normpath(out_dir))}")


def arithmetic(n, seed, held_out=False):
    """n sums of two numbers below 100 made from the seed, as prompts with their answers (rl.py's task; sft.py's and
    dpo.py's built-in data): a tenth of the 10,000 sums, picked by a hash, are only ever held out (held_out=True)."""
    r = random.Random(seed)
    rows = []
    while len(rows) < n:
        a, b = r.randrange(100), r.randrange(100)
        if ((a * 31 + b * 17) % 97 < 10) == held_out:
            rows.append(dict(messages=[dict(role="user", content=f"What is {a} + {b}?")], answer=str(a + b),
                             reply=f"{a} + {b} = {a + b}"))
    return rows


def pydocs_chat(per_topic=4, turns=3, answer_chars=600, seed=0):
    """Conversations made from Python's reference docs (pydoc_data.topics): a user asks about a topic in one of a
    few ways, the assistant answers with the topic's first paragraphs; "tell me more" gets the next ones. Every
    topic is asked once per round, so the last conversations (validation) ask again about topics seen in training."""
    from pydoc_data.topics import topics
    rng = random.Random(seed)
    asks = ["Tell me about {}.", "What is {}?", "Explain {}.", "What do the docs say about {}?", "How does {} work?"]
    more = ["Tell me more.", "Go on.", "What else?", "And then?"]
    answers = {}
    for key in sorted(topics):
        title, _, body = topics[key].strip().partition("\n")
        subject = " ".join(w if '"' in w else w.lower() for w in title.split())
        chunks, chunk = [], ""
        for paragraph in body.lstrip("*\n").split("\n\n"):
            chunk = f"{chunk}\n\n{paragraph}" if chunk else paragraph
            if len(chunk) >= answer_chars:
                chunks.append(chunk.strip("\n"))
                chunk = ""
        answers[subject] = (chunks + [chunk.strip("\n")] if chunk.strip() else chunks)[:turns]
    conversations = []
    for _ in range(per_topic):
        for subject, chunks in answers.items():
            messages = [dict(role="user", content=rng.choice(asks).format(subject))]
            for i, answer in enumerate(chunks):
                if i:
                    messages.append(dict(role="user", content=rng.choice(more)))
                messages.append(dict(role="assistant", content=answer))
            conversations.append(messages)
    return conversations
