"""
Hugging Face tokenizers both ways: our vocabularies (characters, a byte-level BPE, GPT-2's tiktoken) written as
tokenizer.json + tokenizer_config.json that AutoTokenizer reads, and a folder's tokenizer.json, chat template and
special tokens read as our meta. hf.py uses it for whole model folders. Not run by itself.
"""

import json
import os

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers

from chat_templates import jinja
from dataset import atomic_write, read_json, token_dtype, write_json
from errors import die
from tokenizer import BOS, EOS, check_tokenizer, gpt2_encoding, load_tokenizer

GPT2_META = dict(tokenizer="gpt2", vocab_size=50257, dtype="uint16")


def token_ids(meta):
    """BOS and EOS ids of a checkpoint's tokenizer (None where it has none)."""
    kind = (meta or {}).get("tokenizer")
    if kind == "gpt2":
        return dict(bos=50256, eos=50256)
    if kind == "bpe":
        tok = load_tokenizer(meta)
        return dict(bos=tok.bos_id, eos=tok.eos_id)
    return dict(bos=None, eos=None)


def char_tokenizer(chars):
    """A tokenizers.Tokenizer with one token per character, ids as in our vocabulary."""
    tok = Tokenizer(models.WordLevel({c: i for i, c in enumerate(chars)}, unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")  # every character alone
    tok.decoder = decoders.Fuse()  # and joined back without spaces
    return tok


def bytes_to_unicode():
    """GPT-2's printable stand-in character for each byte (byte-level BPE vocabularies are written in them)."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    moved = [b for b in range(256) if b not in keep]
    return {**{b: chr(b) for b in keep}, **{b: chr(256 + n) for n, b in enumerate(moved)}}


def tiktoken_tokenizer(enc):
    """tiktoken's byte-level BPE (GPT-2's) as a tokenizers.Tokenizer: the vocabulary in GPT-2's characters and
    each token's merge recovered by running BPE on its bytes with the lower ranks only."""
    ranks, char = enc._mergeable_ranks, bytes_to_unicode()
    text = lambda b: "".join(char[x] for x in b)
    merges = []
    for token, rank in sorted(ranks.items(), key=lambda kv: kv[1]):
        parts = [bytes([b]) for b in token]
        while len(parts) > 2:  # merge the lowest-ranked adjacent pair until two parts are left
            i = min(range(len(parts) - 1), key=lambda j: ranks.get(parts[j] + parts[j + 1], rank))
            parts[i:i + 2] = [parts[i] + parts[i + 1]]
        if len(parts) == 2:
            merges.append((text(parts[0]), text(parts[1])))
    tok = Tokenizer(models.BPE({text(t): r for t, r in ranks.items()}, merges))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = sorted(enc._special_tokens, key=enc._special_tokens.get)
    tok.add_special_tokens([AddedToken(s, special=True) for s in specials])
    return tok


def export_tokenizer(meta, dest, block_size):
    """tokenizer.json and tokenizer_config.json in dest, so AutoTokenizer encodes text to our ids."""
    kind, specials = meta.get("tokenizer"), {}
    if kind == "char":
        tok = char_tokenizer(meta["vocab"])
    elif kind == "bpe":
        tok = Tokenizer.from_str(meta["tokenizer_json"])
        specials = {f"{k}_token": meta.get(f"{k}_token", name) for k, name in (("bos", BOS), ("eos", EOS))}
    else:
        tok = tiktoken_tokenizer(gpt2_encoding())
        specials = dict(bos_token="<|endoftext|>", eos_token="<|endoftext|>", unk_token="<|endoftext|>")
    atomic_write(os.path.join(dest, "tokenizer.json"), lambda f: f.write(tok.to_str(pretty=True)))
    specials = {k: v for k, v in specials.items() if tok.token_to_id(v) is not None}
    specials.update(meta.get("special_tokens", {}))  # an imported model's own names, as its template uses them
    if meta.get("chat_template"):  # a chat model: apply_chat_template renders as chat.py does
        template = meta["chat_template"]
        specials["chat_template"] = jinja(template) if isinstance(template, dict) else template
    write_json(os.path.join(dest, "tokenizer_config.json"),
               dict(tokenizer_class="PreTrainedTokenizerFast", clean_up_tokenization_spaces=False,
                    model_max_length=block_size, add_bos_token=False, **specials))


def meta_from_hf(folder, arch, vocab_size):
    """Our meta (the tokenizer) for a Hugging Face folder, or None when it has no tokenizer.json; one line when its
    tokenizer.json cannot encode and decode text (checked here, not first at sampling time)."""
    path = os.path.join(folder, "tokenizer.json")
    if not os.path.isfile(path):
        return dict(GPT2_META) if arch == "gpt2" and vocab_size == 50257 else None
    with open(path, encoding="utf-8") as f:
        text = f.read()  # kept verbatim: warm starts compare it with a dataset's tokenizer.json
    try:
        spec = json.loads(text)
        vocab = spec["model"].get("vocab") or {}
        if spec["model"]["type"] == "WordLevel" and vocab and all(len(c) == 1 for c in vocab):  # a character each
            meta = dict(tokenizer="char", vocab=sorted(vocab, key=vocab.get), vocab_size=len(vocab), dtype="uint16")
        elif len(vocab) == 50257 - 1 and arch == "gpt2":  # GPT-2's own BPE: tiktoken's, as our gpt2 datasets use
            return dict(GPT2_META)
        else:
            config = os.path.join(folder, "tokenizer_config.json")
            settings = read_json(config, "tokenizer_config.json") if os.path.isfile(config) else {}
            names = {k: v.get("content") if isinstance(v, dict) else v
                     for k in ("bos_token", "eos_token") if (v := settings.get(k))}
            meta = dict(tokenizer="bpe", tokenizer_json=text, **names)
        tok = check_tokenizer(meta)
        meta.update(vocab_size=tok.vocab_size, dtype=token_dtype(tok.vocab_size), **chat_template_meta(folder, tok),
                    **generation_meta(folder))
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        die(f"{path} is not a usable Hugging Face tokenizer.json ({type(e).__name__}: {str(e)[:160]}); "
            f"replace it with the model's own tokenizer.json")
    return meta


def tokenizer_meta(folder):
    """The meta of a Hugging Face folder's tokenizer alone (prepare_bpe.py --tokenizer=hf:...)."""
    config = os.path.join(folder, "config.json")
    arch = read_json(config, "config.json").get("model_type") if os.path.isfile(config) else None
    meta = meta_from_hf(folder, arch, 0)
    if meta is None:
        die(f"{folder} has no tokenizer.json; give a model folder (or hub id) that has one")
    return meta


def chat_template_meta(folder, tok):
    """A Hugging Face folder's chat template (tokenizer_config.json's chat_template, chat_template.jinja or
    chat_template.json), the special tokens it may name and the ids that end a turn (its eos_token and
    generation_config.json's eos_token_id); {} when it has none."""
    config = os.path.join(folder, "tokenizer_config.json")
    settings = read_json(config, "tokenizer_config.json") if os.path.isfile(config) else {}
    template = settings.get("chat_template")
    if isinstance(template, list):  # named templates: the default one
        template = next((t["template"] for t in template if t.get("name") == "default"), None)
    if not template and os.path.isfile(os.path.join(folder, "chat_template.jinja")):
        with open(os.path.join(folder, "chat_template.jinja"), encoding="utf-8") as f:
            template = f.read()
    if not template and os.path.isfile(os.path.join(folder, "chat_template.json")):
        template = read_json(os.path.join(folder, "chat_template.json"), "chat_template.json").get("chat_template")
    if not template:
        return {}
    specials = {k: v.get("content") if isinstance(v, dict) else v
                for k in ("bos_token", "eos_token", "unk_token", "pad_token")
                if isinstance(v := settings.get(k), (str, dict))}
    generation = os.path.join(folder, "generation_config.json")
    eos = read_json(generation, "generation_config.json").get("eos_token_id") if os.path.isfile(generation) else None
    to_id = tok.tok.token_to_id if hasattr(tok, "tok") else tok.stoi.get
    stops = ([eos] if isinstance(eos, int) else list(eos or [])) + [to_id(specials.get("eos_token") or "")]
    return dict(chat_template=template, special_tokens=specials, stop_ids=sorted({i for i in stops if i is not None}))


SAMPLING_KEYS = ("temperature", "top_k", "top_p", "min_p", "repetition_penalty")  # generation_config.json's and ours


def generation_meta(folder):
    """The sampling a Hugging Face folder's generation_config.json recommends (do_sample false: greedy), as
    {"generation": {...}}; {} when it recommends none. chat.py and serve.py start from it."""
    path = os.path.join(folder, "generation_config.json")
    settings = read_json(path, "generation_config.json") if os.path.isfile(path) else {}
    found = {k: settings[k] for k in SAMPLING_KEYS if isinstance(settings.get(k), (int, float))
             and not isinstance(settings.get(k), bool)}
    if settings.get("do_sample") is False and found:
        found["temperature"] = 0.0
    return dict(generation=found) if found else {}
