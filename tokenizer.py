"""
Tokenizers behind one small interface (encode, decode, vocab_size, bos_id, eos_id), rebuilt from
a dataset's meta.json (which a checkpoint also carries). Not run by itself.
"""


class CharTokenizer:
    """One token per character; the vocabulary is the list of characters in meta.json."""

    def __init__(self, chars):
        self.chars = list(chars)
        self.stoi = {c: i for i, c in enumerate(self.chars)}
        self.vocab_size = len(self.chars)
        self.bos_id = self.eos_id = None

    def encode(self, text):
        missing = sorted(set(text) - self.stoi.keys())
        if missing:
            raise ValueError(f"characters not in the model's vocabulary: {' '.join(map(repr, missing))}")
        return [self.stoi[c] for c in text]

    def decode(self, ids):
        return "".join(self.chars[i] for i in ids)

    def token_bytes(self):
        """UTF-8 length of every token, for bits per byte."""
        return [len(c.encode("utf-8")) for c in self.chars]


def load_tokenizer(meta):
    """The tokenizer a prepared dataset (or a checkpoint's copy of its meta.json) was encoded with."""
    kind = meta.get("tokenizer")
    if kind == "char":
        return CharTokenizer(meta["vocab"])
    raise ValueError(f"unknown tokenizer {kind!r} in meta.json; re-run the prepare script")


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
