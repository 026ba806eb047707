"""
Tokenizers behind one small interface (encode, decode, token_bytes, vocab_size, bos_id, eos_id),
rebuilt from a dataset's meta.json, which a checkpoint also carries: characters, a byte-level BPE
trained by prepare_bpe.py (Hugging Face tokenizers), or GPT-2's encoding (tiktoken). Not run by itself.
"""

import os

import tiktoken
from tokenizers import Tokenizer

from errors import die

BOS, EOS = "<|bos|>", "<|eos|>"  # document boundaries in our trained BPE
UNK = "<|unk|>"  # a word outside a word-level vocabulary


class CharTokenizer:
    """One token per character; the vocabulary is the list of characters in meta.json."""

    def __init__(self, chars):
        self.chars = list(chars)
        self.stoi = {c: i for i, c in enumerate(self.chars)}
        self.vocab_size = len(self.chars)
        self.bos_id = self.eos_id = self.bos_token = self.eos_token = None

    def encode_chat(self, text):
        """A rendered chat template's text as ids (a character vocabulary has no special tokens to parse)."""
        return self.encode(text)

    def known(self, text):
        """text without the characters the vocabulary lacks, and those characters (sorted)."""
        missing = sorted(set(text) - self.stoi.keys())
        return "".join(c for c in text if c in self.stoi), missing

    def encode(self, text):
        missing = sorted(set(text) - self.stoi.keys())
        if missing:
            raise ValueError(f"characters not in the model's vocabulary: {' '.join(map(repr, missing))}")
        return [self.stoi[c] for c in text]

    def decode(self, ids):
        return "".join(self.chars[i] for i in ids)

    decode_all = decode  # (no special tokens)

    def token_bytes(self):
        """UTF-8 length of every token, for bits per byte."""
        return [len(c.encode("utf-8")) for c in self.chars]


class BPETokenizer:
    """A Hugging Face tokenizers tokenizer (a tokenizer.json): a byte-level BPE, or a word-level vocabulary, with
    BOS/EOS specials (ours, or the names meta.json gives for an imported model's tokenizer)."""

    def __init__(self, tok, bos=BOS, eos=EOS):
        self.tok = tok
        self.word_level = type(tok.model).__name__ == "WordLevel"
        tok.encode_special_tokens = True  # "<|bos|>" written in a text is text; special ids are only ever placed
        self.vocab_size = tok.get_vocab_size()
        self.bos_id, self.eos_id = tok.token_to_id(bos), tok.token_to_id(eos)
        self.bos_token = bos if self.bos_id is not None else None
        self.eos_token = eos if self.eos_id is not None else None
        self.specials = {i for i in (self.bos_id, self.eos_id) if i is not None}

    def encode(self, text):
        return self.tok.encode(text, add_special_tokens=False).ids

    def encode_chat(self, text):
        """A rendered chat template's text as ids, its special tokens parsed (as transformers' apply_chat_template
        does); plain encode() keeps them as text, so a user typing "<|im_end|>" types text."""
        self.tok.encode_special_tokens = False
        try:
            return self.encode(text)
        finally:
            self.tok.encode_special_tokens = True

    def encode_batch(self, texts):
        return [e.ids for e in self.tok.encode_batch_fast(texts, add_special_tokens=False)]  # no offsets: faster

    def decode(self, ids):
        return self.tok.decode([i for i in ids if i not in self.specials], skip_special_tokens=False)

    def decode_all(self, ids):
        """The text with the special tokens written out (<|user|>, <|im_end|>): what the model saw."""
        return self.tok.decode(ids, skip_special_tokens=False)

    def token_bytes(self):
        """UTF-8 length of every token, for bits per byte (0 for specials and <|unk|>, whose text is unknown)."""
        if self.word_level:  # tokens are text
            return [0 if i in self.specials or t == UNK else len(t.encode("utf-8"))
                    for i, t in enumerate(map(self.tok.id_to_token, range(self.vocab_size)))]
        # byte-level BPE: each character of a token's string stands for exactly one byte
        return [0 if i in self.specials else len(self.tok.id_to_token(i)) for i in range(self.vocab_size)]


class TiktokenTokenizer:
    """GPT-2's encoding from tiktoken; <|endoftext|> separates documents (both BOS and EOS)."""

    def __init__(self, enc):
        self.enc = enc
        self.vocab_size = enc.n_vocab
        self.bos_id = self.eos_id = enc.eot_token
        self.bos_token = self.eos_token = "<|endoftext|>"

    def encode(self, text):
        return self.enc.encode_ordinary(text)

    def encode_chat(self, text):
        return self.enc.encode(text, allowed_special="all")

    def encode_batch(self, texts):
        return self.enc.encode_ordinary_batch(texts, num_threads=os.cpu_count() or 1)

    def decode(self, ids):
        return self.enc.decode([i for i in ids if i != self.eos_id], errors="replace")

    def decode_all(self, ids):
        """The text with <|endoftext|> written out."""
        return self.enc.decode(ids, errors="replace")

    def token_bytes(self):
        return [0 if i == self.eos_id else len(self.enc.decode_single_token_bytes(i)) for i in range(self.vocab_size)]


def gpt2_encoding():
    """tiktoken's GPT-2 encoding; it downloads its files on first use, so offline this says how to fix it."""
    try:
        return tiktoken.get_encoding("gpt2")
    except Exception as e:  # a network error from deep inside tiktoken: one line instead
        die(f"tiktoken could not load the gpt2 encoding ({type(e).__name__}); it downloads its files on first use: "
            f"go online once, or point TIKTOKEN_CACHE_DIR at a folder holding a cached copy")


def load_tokenizer(meta, folder=None):
    """The tokenizer a prepared dataset (or a checkpoint's copy of its meta.json) was encoded with.
    A BPE comes from meta['tokenizer_json'] (checkpoints carry it) or folder/tokenizer.json."""
    kind = meta.get("tokenizer")
    if kind == "char":
        return CharTokenizer(meta["vocab"])
    if kind == "bpe":
        specials = meta.get("bos_token", BOS), meta.get("eos_token", EOS)
        if "tokenizer_json" in meta:
            return BPETokenizer(Tokenizer.from_str(meta["tokenizer_json"]), *specials)
        return BPETokenizer(Tokenizer.from_file(os.path.join(folder or ".", "tokenizer.json")), *specials)
    if kind == "gpt2":
        return TiktokenTokenizer(gpt2_encoding())
    raise ValueError(f"unknown tokenizer {kind!r} in meta.json; re-run the prepare script")


def check_tokenizer(meta):
    """meta's tokenizer, once it has encoded and decoded a sample text; ValueError saying
    why not (a tokenizer.json that parses but cannot tokenize is refused where it comes in, not at sampling)."""
    try:
        tok = load_tokenizer(meta)
        ids = tok.encode("Hello, world!\n") if not isinstance(tok, CharTokenizer) else tok.encode(tok.chars[0])
        assert ids and all(0 <= i < tok.vocab_size for i in ids) and isinstance(tok.decode(ids), str)
        return tok
    except Exception as e:  # tokenizers raises plain Exceptions for a broken model section
        raise ValueError(f"the tokenizer cannot tokenize ({type(e).__name__}: {str(e)[:120]})") from None


def describe_vocab(meta):
    """A vocabulary in a few words, for messages."""
    if not meta:
        return "an unknown tokenizer"
    known = {"char": f"{meta['vocab_size']} characters", "gpt2": "GPT-2's tokens"}
    kind = "word-level vocabulary" if meta.get("word_level") else "BPE"
    return known.get(meta["tokenizer"], f"a {meta['vocab_size']}-token {kind}")


def held_back(text, stops):
    """How many trailing characters of text could be the start of a stop string (so are not shown yet)."""
    return max((n for s in stops for n in range(1, len(s)) if text.endswith(s[:n])), default=0)


class TextStream:
    """Token ids in, text out as soon as it is final: never half a UTF-8 character (StreamDecoder), never a stop
    string or what may be the start of one. `stopped` turns true when a stop string appears; the text ends there."""

    def __init__(self, tokenizer, stops=()):
        self.decoder, self.stops = StreamDecoder(tokenizer), list(stops)
        self.text, self.sent, self.stopped = "", 0, False

    def push(self, token_id):
        """Add a token; return the text that became final (possibly empty)."""
        self.text += self.decoder.push(token_id)
        hits = [self.text.find(s) for s in self.stops if s in self.text]
        if hits:
            self.text, self.stopped = self.text[:min(hits)], True
            return self.take(len(self.text))
        return self.take(len(self.text) - held_back(self.text, self.stops))

    def flush(self):
        """The rest, at the end of the stream."""
        if not self.stopped:
            self.text += self.decoder.flush()
        return self.take(len(self.text))

    def take(self, upto):
        new, self.sent = self.text[self.sent:upto], max(self.sent, upto)
        return new


def encode_prompt(tokenizer, text):
    """Token ids for the prompt, primed with BOS when the tokenizer has one; stops with one line
    listing any characters the vocabulary lacks."""
    try:
        ids = tokenizer.encode(text)
    except ValueError as e:  # sample.py stops here; serve.py leaves such characters out first
        die(f"the prompt has {e}; rephrase it with characters the model knows")
    if tokenizer.bos_id is not None:
        ids = [tokenizer.bos_id] + ids
    if not ids:  # a char model with an empty prompt: start from a newline, or token 0
        try:
            ids = tokenizer.encode("\n")[:1] or [0]
        except ValueError:
            ids = [0]
    return ids


class StreamDecoder:
    """Turn token ids arriving one at a time into text: holds back output while the tail is an
    incomplete multi-byte character (byte-level BPE splits them across tokens)."""

    def __init__(self, tokenizer):
        self.tokenizer, self.ids, self.printed = tokenizer, [], 0

    def push(self, token_id):
        """Add a token; return the newly completed text (possibly empty)."""
        self.ids.append(token_id)
        text = self.tokenizer.decode(self.ids)
        if text.endswith("\ufffd"):
            return ""
        new, self.printed = text[self.printed:], len(text)
        if len(self.ids) > 64:  # keep decoding cheap: restart from the text already printed
            self.ids, self.printed = [], 0
        return new

    def flush(self):
        """The text still held back, at the end of the stream (an unfinished character decodes as \ufffd)."""
        new = self.tokenizer.decode(self.ids)[self.printed:]
        self.ids, self.printed = [], 0
        return new
