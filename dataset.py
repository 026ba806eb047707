"""
The files a dataset and a run folder are made of, in one torch-free module: finding the input documents, writing
train.bin / val.bin and meta.json atomically (the atomic write every other file goes through too), and reading and
checking them again. Not run by itself.
"""

import hashlib
import json
import os
import urllib.request
from pathlib import Path

import numpy as np

from errors import die
from tokenizer import check_tokenizer

SHAKESPEARE_URL = "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"
SHAKESPEARE = (1115394, "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed")  # its size and sha256


def token_dtype(vocab_size):
    """The bins' dtype: uint16 while every id fits, else uint32."""
    return "uint16" if vocab_size <= 65535 else "uint32"


def sha256(data):
    return hashlib.sha256(data).hexdigest()


# -----------------------------------------------------------------------------
# writing: every file goes to a temporary name first and is renamed into place once whole


def atomic_write(path, write, binary=False, keep_note=""):
    """Call write(f) on path + '.tmp', flush it to the disk and rename it over path, so a crash, a full disk or a
    read-only folder never leaves a half file and never touches the file already there. On failure the temporary
    file is removed and the script stops with one line (keep_note says what the user still has)."""
    tmp = path + ".tmp"
    try:
        with open(tmp, "wb" if binary else "w", **({} if binary else dict(encoding="utf-8", newline=""))) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        if hasattr(os, "O_DIRECTORY"):  # the rename itself reaches the disk (POSIX)
            fd = os.open(os.path.dirname(os.path.abspath(path)), os.O_DIRECTORY)
            os.fsync(fd)
            os.close(fd)
    except (OSError, RuntimeError) as e:  # RuntimeError: torch.save's own wrapper of a failed write
        if os.path.exists(tmp):
            os.remove(tmp)
        reason = getattr(e, "strerror", None) or str(e).splitlines()[0][:160]
        die(f"could not write {path} ({reason}); free some space or make the folder writable"
            + (f": {keep_note}" if keep_note else ""))


def write_json(path, obj):
    atomic_write(path, lambda f: json.dump(obj, f, indent=1, ensure_ascii=False))


def check_writable(out_dir, flag="--out_dir"):
    """Stop with one line unless out_dir is a folder that can be written, or one that can be created."""
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        die(f"{flag}={out_dir} is a file, not a folder; pick another {flag}")
    existing = os.path.abspath(out_dir)
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing) or not os.access(existing, os.W_OK):
        die(f"{flag}={out_dir} is not writable (read-only, or {existing} is not a folder); pick another {flag}")


def make_out_dir(out_dir, flag="--out_dir"):
    """Create out_dir (and its parents), or stop with one line if it is a file or cannot be created."""
    check_writable(out_dir, flag)
    try:
        os.makedirs(out_dir, exist_ok=True)
    except OSError as e:
        die(f"{flag}={out_dir} cannot be created ({e.strerror}); pick another {flag}")


def write_dataset(out_dir, arrays, meta):
    """Write the arrays ({file name: numpy array}, e.g. train.bin) and then meta.json, each atomically: a failure
    part-way leaves the dataset that was there (or none), never a mix."""
    make_out_dir(out_dir)
    for name, values in arrays.items():
        atomic_write(os.path.join(out_dir, name), lambda f, a=values: f.write(np.ascontiguousarray(a).data),
                     binary=True)  # (not ndarray.tofile, whose C writes can lose a full disk's error)
    write_json(os.path.join(out_dir, "meta.json"), meta)


def write_vocab(out_dir, meta):
    """A run folder's meta.json (and tokenizer.json for a BPE): what sample.py and chat.py decode with."""
    write_json(os.path.join(out_dir, "meta.json"), {k: v for k, v in meta.items() if k != "tokenizer_json"})
    if "tokenizer_json" in meta:
        atomic_write(os.path.join(out_dir, "tokenizer.json"), lambda f: f.write(meta["tokenizer_json"]))


def check_out_dir(out_dir, source, digest=None):
    """Before preparing into out_dir: it must be a folder we can write, and not hold a dataset prepared from a
    different source (the same text from another path, by its sha256, is the same source)."""
    check_writable(out_dir)
    path = os.path.join(out_dir, "meta.json")
    if os.path.exists(path):
        old = read_json(path, "dataset meta.json", "choose another --out_dir or delete it")
        if not isinstance(old, dict):
            die(f"{path} is not a dataset meta.json; choose another --out_dir or delete it")
        if old.get("source") != source and not (digest and old.get("sha256") == digest):
            name = os.path.basename(os.path.normpath(out_dir))
            die(f"{out_dir} already holds a dataset prepared from {old.get('source')}; delete it, or write this one "
                f"elsewhere: --out_dir=data/NAME (then train with --dataset=NAME, not {name})")


# -----------------------------------------------------------------------------
# reading


def read_json(path, what, fix="make it again"):
    """A JSON file's contents, or one line saying it is not usable and how to fix it."""
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError) as e:
        die(f"{path} is not a readable {what} ({type(e).__name__}: {e}); {fix}")


def read_meta(data_dir):
    """A prepared dataset's meta.json, checked, or one line saying how to make it."""
    path = os.path.join(data_dir, "meta.json")
    if not os.path.isfile(path):
        name = os.path.basename(os.path.normpath(data_dir))
        stem, _, kind = name.rpartition("_")
        source = "" if stem == "pydocs" else f" --input={stem or 'FILE'}"
        command = {"char": f"python prepare_char.py{source}", "bpe": f"python prepare_bpe.py{source}",
                   "gpt2": f"python prepare_bpe.py{source} --tokenizer=gpt2"}.get(kind)
        hint = f"`{command}` makes it" if command else "make it with prepare_char.py or prepare_bpe.py"
        if name == "pydocs_gpt2":  # train.py's defaults: a GPT-2-small run wants a real corpus
            hint += " (0.5 MB of docs; for a real GPT-2-small run see the README's recipe: a large corpus with --input)"
        die(f"{path} not found; prepare the dataset first: {hint} (--input=FILE/FOLDER for your own text)")
    meta = read_json(path, "dataset meta.json", "prepare the dataset again")
    try:
        assert isinstance(meta, dict) and meta.get("tokenizer") in ("char", "bpe", "gpt2")
        assert meta["dtype"] in ("uint16", "uint32") and int(meta["vocab_size"]) >= 1
        assert meta["tokenizer"] != "char" or len(meta["vocab"]) == meta["vocab_size"]
    except (ValueError, AssertionError, KeyError, TypeError):
        die(f"{path} is not a valid dataset meta.json (a tokenizer, vocab_size or dtype (uint16/uint32) it cannot "
            f"have); prepare the dataset again")
    return meta


def check_bins(data_dir, meta, block_size, fix="lower --block_size"):
    """Stop with one line unless data_dir's bins are whole, longer than a window of block_size, within the
    vocabulary and, for conversations, have masks and starts that match and some reply within a window of a
    conversation's start. `fix` says what to do about too short a dataset with the caller's own settings."""
    dtype = np.dtype(meta["dtype"])
    for split in ("train", "val"):
        path = os.path.join(data_dir, f"{split}.bin")
        size = os.path.getsize(path) if os.path.isfile(path) else -1
        if size < 0 or size % dtype.itemsize:
            what = "missing" if size < 0 else f"not a whole number of {meta['dtype']} tokens"
            die(f"{path} is {what}; prepare the dataset again")
        if size // dtype.itemsize <= block_size and "chat_template" not in meta:  # conversations are padded
            die(f"{path} has {size // dtype.itemsize} tokens, fewer than a window of {block_size + 1}; {fix}")
        if (top := int(np.memmap(path, dtype=dtype, mode="r")[:1 << 20].max())) >= meta["vocab_size"]:
            die(f"{path} holds token id {top}, beyond meta.json's vocab_size={meta['vocab_size']}; "
                f"prepare the dataset again")  # (train.py's get_batch checks the rest as it reads)
        if "chat_template" not in meta:
            continue
        mask, starts = (os.path.join(data_dir, f"{split}_{part}.bin") for part in ("mask", "starts"))
        if not (os.path.isfile(mask) and os.path.isfile(starts) and os.path.getsize(mask) == size // dtype.itemsize):
            die(f"{mask} or {starts} is missing or does not match {split}.bin; prepare the dataset again")
        loss_mask = np.memmap(mask, mode="r")
        if not any(loss_mask[s + 1:s + block_size + 1].any() for s in np.fromfile(starts, np.int64, count=1000)):
            die(f"in {path} no reply starts within block_size={block_size} tokens of its conversation's start, so "
                f"there is nothing to learn; raise --block_size")


def open_split(data_dir, meta, split):
    """What training.get_batch reads of a split: its bin's path and dtype, and for conversations the memory maps of
    the loss mask and the conversation starts (None for plain text)."""
  
    part = lambda name, dtype: np.memmap(os.path.join(data_dir, f"{split}_{name}.bin"), dtype=dtype, mode="r")
    chat = "chat_template" in meta
    return dict(split=split, path=os.path.join(data_dir, f"{split}.bin"), dtype=meta["dtype"],
                vocab_size=meta["vocab_size"], mask=part("mask", np.uint8) if chat else None,
                starts=part("starts", np.int64) if chat else None)


def read_dataset(data_dir):
    """read_meta() and the dataset's tokenizer; a BPE's tokenizer.json goes into meta['tokenizer_json'], so the
    checkpoints that carry meta can decode with out_dir alone."""
    meta = read_meta(data_dir)
    try:
        if meta["tokenizer"] == "bpe":
            with open(os.path.join(data_dir, meta.get("tokenizer_file") or "tokenizer.json"), encoding="utf-8") as f:
                meta["tokenizer_json"] = f.read()
        return meta, check_tokenizer(meta)
    except (OSError, ValueError) as e:  # missing, or not a usable tokenizer.json
        die(f"{data_dir}'s tokenizer cannot be read ({e}); prepare the dataset again")


# -----------------------------------------------------------------------------
# the input documents of the prepare scripts


def download(url, path):
    """Fetch url into path once (later calls reuse the cached copy)."""
    if os.path.isfile(path):
        return path
    try:
        with urllib.request.urlopen(url, timeout=30) as r:
            data = r.read()
    except OSError as e:
        die(f"could not download {url} ({getattr(e, 'reason', e)}); offline? "
            f"save the text yourself and use --input=FILE")
    make_out_dir(os.path.dirname(path) or ".")
    atomic_write(path, lambda f: f.write(data), binary=True)
    return path


def decode_text(raw, where):
    """Bytes to str, refusing what is not a text corpus."""
    if b"\x00" in raw:
        die(f"{where} looks binary (it contains NUL bytes); give a UTF-8 text file")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        die(f"{where} is not UTF-8 text (bad byte at offset {e.start}); convert it, e.g. `iconv -t utf-8`")


def find_documents(spec):
    """(name, source description, documents) for an --input spec. A document is a str (built-in text) or a Path
    to read later, so that big corpora can be streamed (see prepare_bpe.py)."""
    if spec == "pydocs":
        import pydoc_data.topics
        topics = pydoc_data.topics.topics
        return ("pydocs", "pydoc_data.topics (Python reference docs)",
                [topics[k].strip("\n") + "\n\n" for k in sorted(topics)])
    if spec == "shakespeare":
        path = download(SHAKESPEARE_URL, os.path.join("data", "shakespeare_char", "input.txt"))
        return "shakespeare", SHAKESPEARE_URL, [Path(path)]
    if spec.startswith(("http://", "https://")):
        name = os.path.splitext(os.path.basename(spec.rstrip("/")))[0] or "download"
        return name, spec, [Path(download(spec, os.path.join("data", f"{name}_char", "input.txt")))]
    if os.path.isdir(spec):
        files = sorted(f for f in os.listdir(spec) if f.endswith(".txt"))
        if not files:
            die(f"folder {spec} has no *.txt files")
        return os.path.basename(os.path.abspath(spec)), os.path.abspath(spec), [Path(spec, f) for f in files]
    if os.path.isfile(spec):
        size = os.path.getsize(spec)
        if (size, sha256(Path(spec).read_bytes()) if size == SHAKESPEARE[0] else "") == SHAKESPEARE:
            return "shakespeare", SHAKESPEARE_URL, [Path(spec)]  # a local copy of tiny Shakespeare: the configs' name
        return os.path.splitext(os.path.basename(spec))[0], os.path.abspath(spec), [Path(spec)]
    die(f"--input={spec!r} is not pydocs, shakespeare, a URL, an existing file or a folder")


def read_document(doc):
    """A document's whole text."""
    if isinstance(doc, str):
        return doc
    with open(doc, "rb") as f:
        return decode_text(f.read(), doc)
