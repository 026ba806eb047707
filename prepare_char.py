"""
Prepare a character-level dataset: train.bin / val.bin (raw uint16 token ids, interchangeable with
nanoGPT's) and meta.json (the vocabulary as a list of characters, counts, source, split).

    python prepare_char.py                          # Python's reference docs -> data/pydocs_char
    python prepare_char.py --input=shakespeare      # tiny Shakespeare (downloaded once) -> data/shakespeare_char
    python prepare_char.py --input=notes.txt        # a file, a folder of *.txt, or an http(s) URL
    python prepare_char.py --input=pydocs_chat      # conversations (or chats.jsonl) for SFT, see sft.py
    python prepare_char.py --input=arithmetic       # worked sums, the RL recipe's SFT data -> data/arithmetic_char
"""

import os
import random
import re
import unicodedata

import numpy as np

from chat_templates import CHAR_END, TEXT_MARKERS, make_template
from configurator import POSITIVE, check, configure
from dataset import check_out_dir, find_documents, read_document, read_json, sha256, write_dataset
from errors import die
from sft import is_chat_input, read_conversations, write_chat_dataset
from tokenizer import CharTokenizer

# -----------------------------------------------------------------------------
input = "pydocs"  # pydocs | shakespeare | a .txt file | a folder of *.txt | a URL | pydocs_chat | arithmetic | .jsonl
out_dir = ""  # where to write; '' = data/<name>_char, e.g. data/pydocs_char
val_fraction = 0.1  # share of the text held out for validation
split = "tail"  # tail (the last val_fraction of the text) | random (whole chunks, seeded)
chunk_size = 10000  # characters per chunk for split=random
seed = 1337  # seed for split=random
# '' (keep the text as it is) | basic (curly quotes, dashes, odd spaces to ASCII; control characters dropped)
sanitize = ""
collapse_whitespace = False  # runs of spaces/tabs to one space, 3+ newlines to 2
lowercase = False  # lowercase everything (a smaller vocabulary)
# a prepared dataset (data/NAME) whose characters keep their ids, new ones after them (to fine-tune its models)
vocab_from = ""
# -----------------------------------------------------------------------------

def split_text(text, val_fraction, split, chunk_size, seed):
    """Return (train_text, val_text)."""
    if split == "tail":
        n = int(len(text) * (1 - val_fraction))
        return text[:n], text[n:]
    chunks = [text[i:i + chunk_size] for i in range(0, len(text), chunk_size)]
    n_val = max(1, round(len(chunks) * val_fraction))
    val_ids = set(random.Random(seed).sample(range(len(chunks)), n_val)) if len(chunks) > 1 else set()
    train = "".join(c for i, c in enumerate(chunks) if i not in val_ids)
    return train, "".join(c for i, c in enumerate(chunks) if i in val_ids)


# --sanitize=basic: typographic characters to their ASCII look-alikes, invisible ones dropped
BASIC = str.maketrans({**dict.fromkeys("\u2018\u2019\u201a\u201b\u2032", "'"),
                       **dict.fromkeys("\u201c\u201d\u201e\u201f\u2033", '"'),
                       **dict.fromkeys("\u2010\u2011\u2012\u2013\u2014\u2015\u2212", "-"), "\u2026": "...",
                       **dict.fromkeys("\u00a0\u2000\u2001\u2002\u2003\u2004\u2005\u2006\u2007\u2008\u2009\u200a"
                                       "\u202f\u205f\u3000", " "),
                       **dict.fromkeys("\u200b\u200c\u200d\u2060\ufeff\u00ad")})


def clean(text):
    """The text after --sanitize, --collapse_whitespace and --lowercase (in that order)."""
    if sanitize == "basic":
        text = text.replace("\r\n", "\n").translate(BASIC)
        text = "".join(c for c in text if c in "\n\t" or unicodedata.category(c) != "Cc")
    if collapse_whitespace:
        text = re.sub(r"\n{3,}", "\n\n", re.sub(r"[ \t]+", " ", text))
    return text.lower() if lowercase else text


def vocabulary(text):
    """The characters of text, sorted; with --vocab_from, that dataset's characters first, at their ids, and only
    the new ones after them, so a model trained on it can be fine-tuned here (train.py grows its embeddings)."""
    chars = sorted(set(text))
    if not vocab_from:
        return chars
    fix = "give a folder prepare_char.py wrote"
    base = read_json(os.path.join(vocab_from, "meta.json"), "character dataset's meta.json", fix)
    base = base.get("vocab") if isinstance(base, dict) else None
    if not (isinstance(base, list) and all(isinstance(c, str) and len(c) == 1 for c in base)):
        die(f"--vocab_from={vocab_from}: its meta.json holds no character vocabulary; {fix}")
    known = set(base)
    return base + [c for c in chars if c not in known]


if __name__ == "__main__":
    configure(globals())
    if split not in ("tail", "random"):
        die(f"--split={split!r} is not one of tail, random")
    check(globals(), dict(val_fraction=(lambda v: 0 < v < 1, "in (0, 1)"), chunk_size=POSITIVE))
    if sanitize not in ("", "basic"):
        die(f"--sanitize={sanitize!r} is not one of '' (off), basic")
    if is_chat_input(input):  # conversations for SFT: a text template whose turns end with ␄
        name, source, conversations = read_conversations(input)
        for n, m in ((n, m) for n, c in enumerate(conversations, 1) for m in c):
            m["content"] = clean(m["content"])
            if CHAR_END in m["content"]:  # it would read as the end of the turn, and be learned as one
                die(f"conversation {n} of --input={input} contains {CHAR_END!r}, which ends a turn in a character "
                    f"model's template; remove it from the text (or use prepare_bpe.py, whose end token is special)")
        text = "".join(m["content"] for c in conversations for m in c)
        chars = vocabulary(text + "".join(TEXT_MARKERS.values()) + CHAR_END)
        out_dir = out_dir or os.path.join("data", f"{name}_char")
        check_out_dir(out_dir, source)
        meta = dict(tokenizer="char", vocab=chars, sanitize=sanitize, collapse_whitespace=collapse_whitespace,
                    lowercase=lowercase, source=source)
        tok = CharTokenizer(chars)
        write_chat_dataset(out_dir, conversations, tok, make_template(tok, "char"), meta, val_fraction, split, seed)
        raise SystemExit
    name, source, docs = find_documents(input)
    text = clean("".join(read_document(d) for d in docs))
    if not text.strip():
        die(f"--input={input} is empty; give a text with some content")
    train_text, val_text = split_text(text, val_fraction, split, chunk_size, seed)
    if len(train_text) < 2 or len(val_text) < 2:
        die(f"--input={input} ({len(text)} characters) is too small to split with val_fraction={val_fraction}")
    chars = vocabulary(text)
    if len(chars) > 65535:
        die(f"{len(chars)} distinct characters do not fit uint16; use prepare_bpe.py for this corpus")
    stoi = {c: i for i, c in enumerate(chars)}
    out_dir = out_dir or os.path.join("data", f"{name}_char")
    digest = sha256(text.encode("utf-8"))
    check_out_dir(out_dir, source, digest)
    meta = dict(tokenizer="char", vocab=chars, vocab_size=len(chars), dtype="uint16", sha256=digest,
                sanitize=sanitize, collapse_whitespace=collapse_whitespace, lowercase=lowercase,
                train_tokens=len(train_text), val_tokens=len(val_text),
                train_bytes=len(train_text.encode("utf-8")), val_bytes=len(val_text.encode("utf-8")),
                source=source, split=split, val_fraction=val_fraction, seed=seed)
    write_dataset(out_dir, {"train.bin": np.array([stoi[c] for c in train_text], dtype=np.uint16),
                            "val.bin": np.array([stoi[c] for c in val_text], dtype=np.uint16)}, meta)
    print(f"{source}: {len(text):,} characters, {len(docs):,} documents, vocab {len(chars)}")
    print(f"wrote {out_dir}/train.bin ({len(train_text):,} tokens), val.bin ({len(val_text):,} tokens), meta.json; "
          f"train with --dataset={os.path.basename(os.path.normpath(out_dir))}")
