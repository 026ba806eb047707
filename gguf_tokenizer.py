"""
GGUF tokenizers both ways (gguf_file.py reads and writes the rest of a file): tokenizer.ggml.* read into our meta, a
tokenizers.Tokenizer as a tokenizer.json, with its special ids and chat template: byte-level BPE ("gpt2": its
vocabulary, merges and pre-tokenizer) and SentencePiece-style BPE ("llama": Llama 2, Mistral, Gemma; pieces with
scores, merges derived from the scores, byte fallback); written back for byte-level BPE. Not run by itself.
"""

import json

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers

from chat_templates import jinja
from errors import die
from hf_tokenizer import bytes_to_unicode, tiktoken_tokenizer, token_ids
from tokenizer import gpt2_encoding

CONTROL = 3  # llama.cpp's token type of a special token (<|im_end|>, say)
# llama.cpp's pre-tokenizers (tokenizer.ggml.pre) other than GPT-2's own, as tokenizers' pieces
LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")
QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
               r"|\s*[\r\n]+|\s+(?!\S)|\s+")
SPLITS = {"llama-bpe": LLAMA3_SPLIT, "llama3": LLAMA3_SPLIT, "smaug-bpe": LLAMA3_SPLIT, "qwen2": QWEN2_SPLIT,
          "deepseek-r1-qwen": QWEN2_SPLIT}



def tokenizer_meta(meta, where):
    """Our meta for the file's tokenizer: byte-level BPE (tokenizer.ggml.model gpt2) or SentencePiece-style BPE
    (llama) as a tokenizer.json, its bos/eos tokens, and its chat template with the ids that end a turn."""
    kind, tokens = meta.get("tokenizer.ggml.model"), meta["tokenizer.ggml.tokens"]
    if kind not in ("gpt2", "llama"):
        die(f"{where}: its tokenizer is {kind!r}; yoctoGPT reads byte-level BPE (gpt2) and SentencePiece BPE (llama) "
            f"vocabularies from GGUF files")
    types = meta.get("tokenizer.ggml.token_type") or []
    tok, readable = byte_level(meta) if kind == "gpt2" else sentencepiece(meta)
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False)
                            for t, kind in zip(tokens, types, strict=False) if kind == CONTROL and readable(t)])
    ids = {k: meta.get(f"tokenizer.ggml.{k}_token_id") for k in ("bos", "eos", "eot")}
    names = {f"{k}_token": tokens[i] for k, i in ids.items() if k != "eot" and i is not None}
    out = dict(tokenizer="bpe", tokenizer_json=tok.to_str(), vocab_size=len(tokens),
               dtype="uint16" if len(tokens) <= 65535 else "uint32", **names)
    template = meta.get("tokenizer.chat_template")
    if template:
        out.update(chat_template=template, special_tokens=names,
                   stop_ids=sorted({i for k, i in ids.items() if k != "bos" and i is not None}))
    return out


def byte_level(meta):
    """(tokenizer, which tokens it can hold as added ones) of a byte-level BPE: GPT-2's characters for bytes, its
    merges, and its pre-tokenizer's split."""
    tokens, char = meta["tokenizer.ggml.tokens"], bytes_to_unicode()
    alphabet = set(char.values())
    vocab = {t if set(t) <= alphabet else "".join(char[b] for b in t.encode("utf-8")): i for i, t in enumerate(tokens)}
    merges = [tuple(m.split(" ", 1)) for m in meta.get("tokenizer.ggml.merges", [])]
    tok = Tokenizer(models.BPE(vocab, merges))
    pre = meta.get("tokenizer.ggml.pre")
    pieces = [pre_tokenizers.Split(Regex(SPLITS[pre]), behavior="isolated")] if pre in SPLITS else \
        [pre_tokenizers.Digits(individual_digits=True)] if pre == "smollm" else []  # else GPT-2's own split
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        pieces + [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=pre not in SPLITS)])
    tok.decoder = decoders.ByteLevel()
    return tok, lambda t: set(t) <= alphabet


def sentencepiece(meta):
    """(tokenizer, which tokens it can hold as added ones) of SentencePiece-style BPE as llama.cpp keeps it: pieces
    with "▁" for spaces and scores (a merge's rank is its result's score: the pairs of pieces whose join is a piece,
    best score first), <0xNN> byte pieces to fall back on, a "▁" before the text where add_space_prefix says so."""
    tokens, scores = meta["tokenizer.ggml.tokens"], meta.get("tokenizer.ggml.scores") or []
    types = meta.get("tokenizer.ggml.token_type") or [1] * len(tokens)
    vocab = {t: i for i, t in enumerate(tokens)}
    score = dict(zip(tokens, scores, strict=False))
    merges = sorted(((left, t[len(left):]) for t in tokens if types[vocab[t]] == 1 and len(t) > 1
                     for left in (t[:k] for k in range(1, len(t))) if left in vocab and t[len(left):] in vocab),
                    key=lambda m: (-score.get(m[0] + m[1], 0.0), vocab[m[0]], vocab[m[1]]))
    unk = next((t for t, kind in zip(tokens, types, strict=False) if kind == 2), None)
    tok = Tokenizer(models.BPE(vocab, merges, unk_token=unk, fuse_unk=True, byte_fallback=True))
    prefix = meta.get("tokenizer.ggml.add_space_prefix", True)  # (before the text, not after each special token)
    tok.pre_tokenizer = pre_tokenizers.Metaspace("▁", prepend_scheme="first" if prefix else "never", split=False)
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
                                    + [decoders.Strip(" ", 1, 0)] * prefix)
    return tok, lambda t: True


def write_tokenizer(writer, meta, vocab_size):
    """The tokenizer in llama.cpp's metadata: a byte-level BPE's tokens (ids without a token padded as llama.cpp
    pads them), merges, token types and pre-tokenizer, the bos/eos ids and the chat template. Other vocabularies
    are refused: llama.cpp would not split text into the same tokens."""
    if meta.get("tokenizer") == "gpt2":  # GPT-2's own (tiktoken's ranks), as a byte-level BPE
        meta = dict(meta, tokenizer="bpe", tokenizer_json=tiktoken_tokenizer(gpt2_encoding()).to_str(),
                    bos_token="<|endoftext|>", eos_token="<|endoftext|>")
    if meta.get("tokenizer") != "bpe" or meta.get("word_level"):
        die(f"a model on {meta.get('tokenizer') or 'no'} vocabulary has no GGUF tokenizer llama.cpp splits text with "
            f"the same way; export models trained on a byte-level BPE (prepare_bpe.py) or imported ones")
    spec, tok = json.loads(meta["tokenizer_json"]), Tokenizer.from_str(meta["tokenizer_json"])
    if spec["model"]["type"] != "BPE":
        die(f"a {spec['model']['type']} tokenizer has no GGUF form llama.cpp reads; export a byte-level BPE model")
    vocab = tok.get_vocab(with_added_tokens=True)
    by_id = {i: t for t, i in vocab.items()}
    tokens = [by_id.get(i, f"[PAD{i}]") for i in range(vocab_size)]
    special = {a.content for a in tok.get_added_tokens_decoder().values() if a.special}
    merges = [m if isinstance(m, str) else " ".join(m) for m in spec["model"].get("merges", [])]
    pre = json.dumps(spec.get("pre_tokenizer"))
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("smollm" if "Digits" in pre else next((k for k, v in SPLITS.items() if json.dumps(v)[1:-1]
                                                                    in pre), "gpt-2"))
    writer.add_token_list(tokens)
    writer.add_token_types([CONTROL if t in special else 5 if t.startswith("[PAD") and t not in vocab else 1
                            for t in tokens])
    writer.add_token_merges(merges)
    ids = token_ids(meta)
    for add, i in ((writer.add_bos_token_id, ids["bos"]), (writer.add_eos_token_id, ids["eos"])):
        if i is not None:
            add(i)
    writer.add_add_bos_token(False)
    template = meta.get("chat_template")
    if template:
        writer.add_chat_template(jinja(template) if isinstance(template, dict) else template)
    end = template.get("end_id") if isinstance(template, dict) else None
    if end is not None and end != ids["eos"]:  # our template's end of turn: where llama.cpp stops a reply
        writer.add_eot_token_id(end)
