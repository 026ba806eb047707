"""
Prepare a token-level dataset: train a byte-level BPE (Hugging Face tokenizers) or use GPT-2's
(tiktoken) or an existing tokenizer.json, then encode the corpus into train.bin / val.bin (uint16,
or uint32 for vocabularies over 65,535) and meta.json. Corpora larger than RAM are streamed: read
in pieces, encoded in batches on all cores, appended to the bins.

    python prepare_bpe.py                                       # Python's docs, trained BPE -> data/pydocs_bpe
    python prepare_bpe.py --input=shakespeare --tokenizer=gpt2  # -> data/shakespeare_gpt2
    python prepare_bpe.py --input=corpus/ --vocab_size=16384    # a folder of *.txt, one document each
    python prepare_bpe.py --input=shard.parquet                 # a 'text' (or pre-tokenized 'tokens') column
    python prepare_bpe.py --tokenizer=data/pydocs_bpe/tokenizer.json --input=more.txt --out_dir=data/more_bpe
    python prepare_bpe.py --info=data/pydocs_bpe                # what a prepared dataset holds
    python prepare_bpe.py --input=pydocs_chat                   # conversations (or chats.jsonl) for SFT, see sft.py
"""

import math
import os
import queue
import random
import re
import shutil
import sys
import threading
import time
from pathlib import Path

import numpy as np
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
from tqdm import tqdm

from chat_templates import CHAT_TOKENS, make_template, template_for
from configurator import POSITIVE, check, configure
from dataset import atomic_write, check_out_dir, find_documents, make_out_dir, read_json, token_dtype, write_json
from errors import die
from gguf_file import gguf_tokenizer
from hf import hub_folder
from hf_tokenizer import tokenizer_meta
from sft import is_chat_input, read_conversations, write_chat_dataset
from tokenizer import BOS, EOS, UNK, BPETokenizer, TiktokenTokenizer, check_tokenizer, gpt2_encoding

# -----------------------------------------------------------------------------
input = "pydocs"  # pydocs | shakespeare | a .txt file | a folder of *.txt | a URL | a .parquet file or folder of them
out_dir = ""  # where to write; '' = data/<name>_bpe (or _gpt2)
# bpe (train one here) | word (a word-level vocabulary, trained here) | gpt2 (tiktoken) | path/to/tokenizer.json |
# hf:ORG/NAME or hf:FOLDER or gguf:FILE (a model's own tokenizer and chat template, to fine-tune that model)
tokenizer = "bpe"
vocab_size = 0  # bpe: size of the trained vocabulary; 0 = by corpus size (~4*sqrt(bytes), 512..32768)
no_bos_eos = False  # do not wrap each document in BOS ... EOS
val_fraction = 0.1  # share of the documents held out for validation
split = "tail"  # tail (the last documents) | random (whole documents, seeded)
seed = 1337  # seed for split=random
chunk_bytes = 4_000_000  # text encoded per batch; memory use follows this, not the corpus size
info = ""  # print what data/<name> holds (splits, vocab, tokenizer, dtype) and exit
# -----------------------------------------------------------------------------

# safe places to split text, best first: byte-level (GPT-2 style) pre-tokenization never joins text across them
CUTS = (re.compile(r"(?<=\S)\n(?=\S)"), re.compile(r"(?<=\S)(?=\s)"))  # a line start; else a word end
PIECE = 1 << 16  # characters per piece of a big file: a batch holds many pieces, so all cores encode


def parquet_files(spec):
    """The .parquet files that --input names, or [] if it names none."""
    if os.path.isdir(spec):
        return sorted(str(p) for p in Path(spec).glob("*.parquet"))
    return [spec] if spec.endswith(".parquet") else []


def parquet_rows(files, column):
    """Yield the values of `column`, one per row (a document), reading row group by row group."""
    for path in files:
        try:
            pf = pq.ParquetFile(path)
            groups = [pf.read_row_group(g, columns=[column]).column(column) for g in range(pf.num_row_groups)]
        except Exception as e:  # not parquet, truncated, a column of another type
            die(f"{path} is not a readable parquet file ({type(e).__name__}: {e})")
        for group in groups:
            yield from group.to_pylist()


def last_cut(buf, size):
    """Where to end the next piece of `buf`: the last safe cut in its final `size` characters; when there is
    none, nowhere yet (None) unless buf is past 16*size, where it is cut anyway so memory stays bounded
    (only text with no whitespace for that long can then encode differently at the seam)."""
    for pattern in CUTS:
        cuts = list(pattern.finditer(buf, max(0, len(buf) - size)))
        if cuts:
            return cuts[-1].end()
    return len(buf) if len(buf) >= 16 * size else None


def pieces(doc, size):
    """Yield a document's text in pieces of about `size` characters, cut where pre-tokenization never joins
    text (see CUTS), so the pieces encode exactly like the whole."""
    if isinstance(doc, str):
        yield doc
        return
    try:
        with open(doc, encoding="utf-8", newline="") as f:
            buf = ""
            while chunk := f.read(size):
                if "\x00" in chunk:
                    die(f"{doc} looks binary (it contains NUL bytes); give UTF-8 text files")
                buf += chunk
                if len(chunk) < size:  # the end of the file: the rest is the last piece
                    break
                if cut := last_cut(buf, size):
                    yield buf[:cut]
                    buf = buf[cut:]
            if buf:
                yield buf
    except UnicodeDecodeError as e:
        die(f"{doc} is not UTF-8 text (bad byte at offset {e.start} of a chunk); convert it, e.g. `iconv -t utf-8`")


def documents(docs, rows):
    """Yield each document as an iterable of parts: text pieces (files are read lazily), or one list of
    token ids for a pre-tokenized parquet row."""
    if rows is None:
        for doc in docs:
            yield pieces(doc, min(chunk_bytes, PIECE))
    else:
        for row in rows:
            yield [row if isinstance(row, list) else row or ""]


def with_ends(parts):
    """Yield (is_first, is_last, part) for each part."""
    prev, first = None, True
    for part in parts:
        if prev is not None:
            yield first, False, prev
            first = False
        prev = part
    if prev is not None:
        yield first, True, prev


def batches(docs, split_of, chunk):
    """Group the corpus into batches of about `chunk` characters: lists of (split, is_first, is_last, part)."""
    batch, size = [], 0
    for i, doc in enumerate(docs):
        for first, last, part in with_ends(doc):
            batch.append((split_of(i), first, last, part))
            size += len(part)
            if size >= chunk:
                yield batch
                batch, size = [], 0
    if batch:
        yield batch


def read_ahead(items, depth=2):
    """Yield `items`, made by a background thread up to `depth` ahead, so reading files overlaps encoding
    (which releases the GIL). An error in the thread (a binary file, say) is raised here."""
    q = queue.Queue(depth)

    def work():
        try:
            for item in items:
                q.put(item)
            q.put(None)
        except BaseException as e:  # die() raises SystemExit: hand it over to the main thread
            q.put(e)
    threading.Thread(target=work, daemon=True).start()
    while (item := q.get()) is not None:
        if isinstance(item, BaseException):
            raise item
        yield item


def encode_documents(tok, docs, split_of, bos, eos, chunk):
    """Yield (split, token ids, text bytes) part by part in corpus order; about `chunk` characters of text
    at a time are encoded in one batch (tokenizers and tiktoken use all cores for it)."""
    for batch in read_ahead(batches(docs, split_of, chunk)):
        encoded = iter(tok.encode_batch([part for *_, part in batch if isinstance(part, str)]))
        for split, first, last, part in batch:
            text = isinstance(part, str)
            ids = next(encoded) if text else [int(t) for t in part]
            if not text and ids and not 0 <= min(ids) <= max(ids) < tok.vocab_size:
                die(f"a pre-tokenized row holds token id {max(ids) if max(ids) >= 0 else min(ids)}, outside the "
                    f"tokenizer's {tok.vocab_size} ids; give the tokenizer the 'tokens' column was made with")
            yield split, (bos if first else []) + ids + (eos if last else []), len(part.encode("utf-8")) if text else 0


def train_tokenizer(docs, rows, size, word=False):
    """A byte-level BPE of `size` tokens trained on the corpus; with word=True, a word-level vocabulary instead:
    the `size` most frequent words (with their leading space, GPT-2's split), punctuation runs and whitespace,
    every other word one <|unk|> token."""
    progress = sys.stderr.isatty()
    if word:
        tok = Tokenizer(models.WordLevel(unk_token=UNK))
        tok.pre_tokenizer = pre_tokenizers.Split(Regex(r" ?\w+| ?[^\w\s]+|\s+(?!\S)|\s+"), behavior="isolated")
        tok.decoder = decoders.Fuse()  # the pieces keep their spaces: joined as they are
        trainer = trainers.WordLevelTrainer(vocab_size=size, special_tokens=[BOS, EOS, *CHAT_TOKENS, UNK],
                                            show_progress=progress)
    else:
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=size, special_tokens=[BOS, EOS, *CHAT_TOKENS], show_progress=progress,
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    texts = (piece for doc in documents(docs, rows) for piece in doc)
    tok.train_from_iterator(texts, trainer=trainer)
    return BPETokenizer(tok)


def print_info(folder):
    path = os.path.join(folder, "meta.json")
    if not os.path.isfile(path):
        die(f"{path} not found; prepare it first")
    meta = read_json(path, "dataset meta.json", "prepare it again")
    for key in ("source", "tokenizer", "vocab_size", "dtype", "train_tokens", "val_tokens", "train_bytes", "val_bytes",
                "documents", "bos_id", "eos_id", "split"):
        if key in meta:
            print(f"{key:>13}: {meta[key]:,}" if isinstance(meta[key], int) else f"{key:>13}: {meta[key]}")


if __name__ == "__main__":
    configure(globals())
    if info:
        print_info(info)
        raise SystemExit
    if split not in ("tail", "random"):
        die(f"--split={split!r} is not one of tail, random")
    least = (8, "7 specials and a word") if tokenizer == "word" else (262, "256 bytes and 6 specials")
    check(globals(), dict(val_fraction=(lambda v: 0 < v < 1, "in (0, 1)"), chunk_bytes=POSITIVE,
                          vocab_size=(lambda v: v == 0 or v >= least[0],
                                      f"0 (sized by the corpus) or >= {least[0]} ({least[1]})")))
    t0 = time.time()

    # the documents: files, built-in texts, or parquet rows
    files = parquet_files(input)
    rows, docs, conversations = None, [], None
    if files:
        try:
            import pyarrow.parquet as pq
        except ImportError:
            die("parquet input needs pyarrow: pip install pyarrow")
        try:
            schema = pq.read_schema(files[0])
        except Exception as e:  # a file named .parquet that is not one
            die(f"{files[0]} is not a readable parquet file ({type(e).__name__}: {e})")
        column = "text" if "text" in schema.names else "tokens" if "tokens" in schema.names else None
        if column is None:
            die(f"{files[0]} has no 'text' or 'tokens' column (it has {', '.join(schema.names)})")
        if column == "tokens" and tokenizer in ("bpe", "word"):
            die("a pre-tokenized 'tokens' column needs the tokenizer it was made with: --tokenizer=gpt2 or PATH.json")
        n_docs = sum(pq.ParquetFile(f).metadata.num_rows for f in files)
        name, source = Path(input).stem, os.path.abspath(input)
        n_bytes = sum(os.path.getsize(f) for f in files)
        make_rows = lambda: parquet_rows(files, column)
    elif is_chat_input(input):  # conversations: the tokenizer learns from their messages' text
        name, source, conversations = read_conversations(input)
        docs = [m["content"] for c in conversations for m in c]
        n_docs, n_bytes = len(conversations), sum(len(d.encode("utf-8")) for d in docs)
        make_rows = lambda: None
    else:
        name, source, docs = find_documents(input)
        n_docs = len(docs)
        n_bytes = sum(len(d.encode("utf-8")) if isinstance(d, str) else os.path.getsize(d) for d in docs)
        make_rows = lambda: None
        if n_bytes == 0:
            die(f"--input={input} is empty; give a text with some content")

    # the tokenizer
    hub = {}  # a given tokenizer's meta (hf: or a tokenizer.json): its text, names, chat template, stop ids
    if tokenizer == "gpt2":
        tok, kind = TiktokenTokenizer(gpt2_encoding()), "gpt2"
    elif tokenizer in ("bpe", "word"):
        size = vocab_size or int(min(32768, max(512, 2 ** round(math.log2(4 * math.sqrt(n_bytes))))))
        what = "a byte-level BPE" if tokenizer == "bpe" else "a word-level vocabulary"
        print(f"training {what} with {size:,} tokens on {n_bytes / 1e6:.1f} MB")
        tok, kind = train_tokenizer(docs, make_rows(), size, word=tokenizer == "word"), "bpe"
    elif tokenizer.startswith(("hf:", "gguf:")):  # a model's own tokenizer, with its names, chat template, stop ids
        hub = gguf_tokenizer(tokenizer) if tokenizer.startswith("gguf:") else tokenizer_meta(hub_folder(tokenizer))
        tok, kind = check_tokenizer(hub), hub["tokenizer"]
    elif os.path.isfile(tokenizer) and tokenizer.endswith(".json"):
        with open(tokenizer, encoding="utf-8") as f:
            hub = dict(tokenizer="bpe", tokenizer_json=f.read())
        try:
            tok, kind = check_tokenizer(hub), "bpe"
        except ValueError as e:  # JSON that is not a tokenizer, or not JSON, or one that cannot tokenize
            die(f"--tokenizer={tokenizer} is not a usable Hugging Face tokenizer.json ({e})")
    else:
        die(f"--tokenizer={tokenizer!r} is not bpe, word, gpt2, hf:ORG/NAME, hf:FOLDER, gguf:FILE or an existing "
            f"tokenizer.json")
    if kind == "char":
        die(f"--tokenizer={tokenizer} is a character vocabulary; prepare the data with prepare_char.py")
    tokenizer_json = hub.get("tokenizer_json")  # written verbatim: a warm start compares it with the model's
    names = {k: hub[k] for k in ("bos_token", "eos_token", "special_tokens", "stop_ids", "chat_template") if k in hub}
    suffix = tokenizer if tokenizer in ("gpt2", "word") else "bpe"
    out_dir = out_dir or os.path.join("data", f"{name}_{suffix}")
    check_out_dir(out_dir, source)
    if conversations is not None and "chat_template" in hub:  # the model's own template
        template = template_for(hub, tok)
    elif conversations is not None:
        if tokenizer.startswith(("hf:", "gguf:")):
            die(f"--tokenizer={tokenizer} has no chat template, and conversations need one: pick a chat (-Instruct) "
                f"model's tokenizer, or let prepare_bpe.py train a BPE with its own")
        if kind == "bpe" and None in map(tok.tok.token_to_id, CHAT_TOKENS):  # an older BPE: chat tokens added after it
            tokenizer_json = None
            tok.tok.add_special_tokens(list(CHAT_TOKENS))
            tok = BPETokenizer(tok.tok)
            print(f"added {', '.join(CHAT_TOKENS)} to the tokenizer (ids from {tok.vocab_size - len(CHAT_TOKENS)}); "
                  f"a model "
                  f"trained with the old one grows its embeddings for them when it is warm-started on this data")
        template = make_template(tok, kind)
    tokenizer_json = tokenizer_json or (tok.tok.to_str(pretty=True) if kind == "bpe" else None)
    if conversations is not None:
        make_out_dir(out_dir)
        if kind == "bpe":
            atomic_write(os.path.join(out_dir, "tokenizer.json"), lambda f: f.write(tokenizer_json))
        meta = dict(tokenizer=kind, tokenizer_file="tokenizer.json" if kind == "bpe" else None,
                    word_level=getattr(tok, "word_level", False), bos_id=tok.bos_id, eos_id=tok.eos_id, source=source,
                    **names)
        write_chat_dataset(out_dir, conversations, tok, template, meta, val_fraction, split, seed)
        raise SystemExit
    dtype = np.dtype(token_dtype(tok.vocab_size))
    bos = [] if no_bos_eos or tok.bos_id is None or tok.bos_id == tok.eos_id else [tok.bos_id]
    eos = [] if no_bos_eos or tok.eos_id is None else [tok.eos_id]

    # which documents are validation: the tail, or a seeded random choice; a single document is split at its tail
    n_val = max(1, round(n_docs * val_fraction)) if n_docs > 1 else 0
    rng = random.Random(seed)
    val_set = set(range(n_docs - n_val, n_docs)) if split == "tail" else set(rng.sample(range(n_docs), n_val))

    # encode, streaming: parts appended to temporary bins as they come
    created = not os.path.isdir(out_dir)
    make_out_dir(out_dir)
    tmp = {s: os.path.join(out_dir, f"{s}.bin.tmp") for s in ("train", "val")}
    counts, nbytes = dict(train=0, val=0), dict(train=0, val=0)
    try:
        with open(tmp["train"], "wb") as train_out, open(tmp["val"], "wb") as val_out, \
                tqdm(total=n_bytes, unit="B", unit_scale=True, desc="encoding", disable=None) as bar:
            outs = dict(train=train_out, val=val_out)
            split_of = lambda i: "val" if i in val_set else "train"
            encoded = encode_documents(tok, documents(docs, make_rows()), split_of, bos, eos, chunk_bytes)
            for split_name, ids, nb in encoded:
                outs[split_name].write(np.asarray(ids, dtype=dtype).data)  # (tofile can lose a write error)
                counts[split_name] += len(ids)
                nbytes[split_name] += nb
                bar.update(nb)
        if n_docs == 1:  # one document: hold out the tail of its tokens, copied without loading the bin
            cut = int(counts["train"] * (1 - val_fraction))
            with open(tmp["train"], "rb+") as f, open(tmp["val"], "wb") as v:
                f.seek(cut * dtype.itemsize)
                v.write(f.read((counts["train"] - cut) * dtype.itemsize))
                f.truncate(cut * dtype.itemsize)
            share = cut / max(counts["train"], 1)
            counts = dict(train=cut, val=counts["train"] - cut)
            nbytes = dict(train=round(nbytes["train"] * share), val=nbytes["train"] - round(nbytes["train"] * share))
        for path in tmp.values():  # on the disk before they replace the old bins
            with open(path, "rb+") as f:
                os.fsync(f.fileno())
    except BaseException as e:  # a bad file met while encoding, Ctrl-C, a full disk: no half dataset is left
        for p in tmp.values():
            if os.path.exists(p):
                os.remove(p)
        if created:
            shutil.rmtree(out_dir, ignore_errors=True)
        if isinstance(e, OSError):
            die(f"could not write to {out_dir} ({e.strerror or e}); free some space or pick another --out_dir")
        raise
    if counts["train"] < 2 or counts["val"] < 2:
        for p in tmp.values():
            os.remove(p)
        if created:
            shutil.rmtree(out_dir, ignore_errors=True)
        die(f"--input={input} is too small to split with val_fraction={val_fraction}")
    for s in ("train", "val"):
        os.replace(tmp[s], os.path.join(out_dir, f"{s}.bin"))
    if kind == "bpe":
        atomic_write(os.path.join(out_dir, "tokenizer.json"), lambda f: f.write(tokenizer_json))
    meta = dict(tokenizer=kind, tokenizer_file="tokenizer.json" if kind == "bpe" else None,
                word_level=getattr(tok, "word_level", False), vocab_size=tok.vocab_size, dtype=dtype.name,
                bos_id=tok.bos_id, eos_id=tok.eos_id, bos_eos=not no_bos_eos, **names,
                train_tokens=counts["train"], val_tokens=counts["val"], train_bytes=nbytes["train"],
                val_bytes=nbytes["val"],
                documents=n_docs, source=source, split=split, val_fraction=val_fraction, seed=seed)
    write_json(os.path.join(out_dir, "meta.json"), meta)
    total_tokens, total_bytes = counts["train"] + counts["val"], nbytes["train"] + nbytes["val"]
    print(f"{source}: {n_docs:,} documents, {total_bytes / 1e6:.1f} MB -> {total_tokens:,} tokens "
          f"({total_tokens / max(total_bytes, 1):.3f} tokens per byte), vocab {tok.vocab_size:,}, "
          f"{time.time() - t0:.1f} s")
    print(f"wrote {out_dir}/train.bin ({counts['train']:,} tokens), val.bin ({counts['val']:,} tokens), meta.json")
