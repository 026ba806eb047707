"""prepare_bpe.py and the token-level path: trained BPE, tiktoken, streaming, dtypes, parquet, bits per byte."""

import json
import runpy
import sys

import numpy as np
import pytest

from conftest import ROOT, TINY, corpus_text, greedy_text, run

DOCS = {"a.txt": "First document.\nIt has two lines.\n",
        "b.txt": "Zweites Dokument: ünïcødé, emoji 😀, e\u0301 combining.\n",
        "c.txt": corpus_text()[:6000], "d.txt": corpus_text()[6000:9000]}


@pytest.fixture(scope="module")
def bpe_data(tmp_path_factory):
    """A folder of four documents prepared with a BPE trained inside the test."""
    d = tmp_path_factory.mktemp("bpe")
    (d / "docs").mkdir()
    for name, text in DOCS.items():
        (d / "docs" / name).write_text(text, encoding="utf-8")
    run("prepare_bpe.py", "--input=docs", "--vocab_size=400", "--val_fraction=0.25", cwd=d)
    return d


def load(folder):
    from tokenizer import load_tokenizer
    meta = json.loads((folder / "meta.json").read_text())
    return meta, load_tokenizer(meta, str(folder))


def split_docs(ids, bos, eos):
    """Cut a bin at the document boundaries: BOS ... EOS."""
    docs, cur = [], None
    for i in ids.tolist():
        if i == bos:
            cur = []
        elif i == eos:
            docs.append(cur)
            cur = None
        else:
            cur.append(i)
    return docs


def test_bins_decode_back_to_the_documents(bpe_data):
    d = bpe_data / "data" / "docs_bpe"
    meta, tok = load(d)
    assert meta["tokenizer"] == "bpe" and meta["vocab_size"] == 400 and meta["dtype"] == "uint16"
    assert meta["documents"] == 4
    train = split_docs(np.fromfile(d / "train.bin", dtype=np.uint16), tok.bos_id, tok.eos_id)
    val = split_docs(np.fromfile(d / "val.bin", dtype=np.uint16), tok.bos_id, tok.eos_id)
    assert [tok.decode(x) for x in train] == [DOCS["a.txt"], DOCS["b.txt"], DOCS["c.txt"]]
    assert [tok.decode(x) for x in val] == [DOCS["d.txt"]]  # split=tail holds out the last documents
    tokens = (d / "train.bin").stat().st_size // 2 + (d / "val.bin").stat().st_size // 2
    assert meta["train_tokens"] + meta["val_tokens"] == tokens


def test_round_trip_arbitrary_unicode(bpe_data):
    from tokenizers import Tokenizer
    _, tok = load(bpe_data / "data" / "docs_bpe")
    assert Tokenizer.from_file(str(bpe_data / "data" / "docs_bpe" / "tokenizer.json")).get_vocab_size() == 400
    for text in ["😀🎉 emoji", "e\u0301 a\u0308 combining", "中文 日本語 한국어", "tab\tand\r\nCRLF",
                 "\x00\x01 control", "    indent"]:
        assert tok.decode(tok.encode(text)) == text
    assert sum(tok.token_bytes()) > 0 and tok.token_bytes()[tok.bos_id] == 0


def test_streaming_equals_in_memory(bpe_data):
    """Tiny read chunks (streaming) and one big chunk give byte-identical bins."""
    tj = bpe_data / "data" / "docs_bpe" / "tokenizer.json"
    run("prepare_bpe.py", "--input=docs", f"--tokenizer={tj}", "--chunk_bytes=64", "--out_dir=data/small_chunks",
        cwd=bpe_data)
    run("prepare_bpe.py", "--input=docs", f"--tokenizer={tj}", "--chunk_bytes=100000000", "--out_dir=data/one_chunk",
        cwd=bpe_data)
    for split in ("train.bin", "val.bin"):
        a = (bpe_data / "data" / "small_chunks" / split).read_bytes()
        data = bpe_data / "data"
        assert a == (data / "one_chunk" / split).read_bytes() == (data / "docs_bpe" / split).read_bytes()


def test_pieces_stay_bounded_and_exact(tmp_path, bpe_data):
    """A file with no line starting at column 0 is cut at word ends (same tokens as the whole); one with no
    whitespace at all is still cut, at 16 pieces' length, so memory never follows the size of a file."""
    from prepare_bpe import pieces
    _, tok = load(bpe_data / "data" / "docs_bpe")
    indented = "".join(f"    line {i}: value = {{'k': [{i}, {i * 7}]}}\n" for i in range(400))
    (tmp_path / "indented.txt").write_text(indented, encoding="utf-8")
    parts = list(pieces(tmp_path / "indented.txt", 256))
    assert "".join(parts) == indented and len(parts) > 20 and max(map(len, parts)) <= 2 * 256
    assert [i for p in parts for i in tok.encode(p)] == tok.encode(indented)
    (tmp_path / "solid.txt").write_text("x" * 100_000, encoding="utf-8")
    parts = list(pieces(tmp_path / "solid.txt", 256))
    assert "".join(parts) == "x" * 100_000 and max(map(len, parts)) <= 17 * 256


def test_big_vocab_selects_uint32(tmp_path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    tok = Tokenizer(models.BPE(vocab={ch: i for i, ch in enumerate(sorted(alphabet))}, merges=[]))
    tok.pre_tokenizer, tok.decoder = pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel()
    tok.add_tokens([f"filler{i}" for i in range(70000 - 256)])  # a vocabulary too big for uint16
    tok.add_special_tokens(["<|bos|>", "<|eos|>"])
    tok.save(str(tmp_path / "big.json"))
    (tmp_path / "t.txt").write_text("hello world\n" * 50, encoding="utf-8")
    run("prepare_bpe.py", "--input=t.txt", "--tokenizer=big.json", cwd=tmp_path)
    meta, t = load(tmp_path / "data" / "t_bpe")
    ids = np.fromfile(tmp_path / "data" / "t_bpe" / "train.bin", dtype=np.uint32)
    assert meta["dtype"] == "uint32" and ids.max() >= 65536  # the specials sit above 70,000
    assert t.decode(ids.tolist()).startswith("hello world\n")


def small_tiktoken():
    """A GPT-2-style tiktoken Encoding built here (no download): bytes plus a few merges."""
    import tiktoken
    ranks = {bytes([b]): b for b in range(256)}
    for m in [b"th", b"he", b"the", b" t", b" the", b"in", b"er"]:
        ranks[m] = len(ranks)
    pat = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
    return tiktoken.Encoding("tiny", pat_str=pat, mergeable_ranks=ranks, special_tokens={"<|endoftext|>": len(ranks)})


def test_tiktoken_path_offline(tmp_path, monkeypatch):
    import tokenizer
    enc = small_tiktoken()
    monkeypatch.setattr(tokenizer, "gpt2_encoding", lambda: enc)
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "1.txt").write_text("the theme of the thing\n", encoding="utf-8")
    (tmp_path / "docs" / "2.txt").write_text("in other words ünï 😀\n", encoding="utf-8")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["prepare_bpe.py", "--input=docs", "--tokenizer=gpt2", "--val_fraction=0.5"])
    runpy.run_path(f"{ROOT}/prepare_bpe.py", run_name="__main__")
    d = tmp_path / "data" / "docs_gpt2"
    meta, tok = load(d)
    eot = enc.eot_token
    train, val = (np.fromfile(d / f"{s}.bin", dtype=np.uint16).tolist() for s in ("train", "val"))
    assert meta["tokenizer"] == "gpt2" and meta["eos_id"] == eot and train[-1] == eot and train.count(eot) == 1
    assert tok.decode(train) == "the theme of the thing\n" and tok.decode(val) == "in other words ünï 😀\n"
    assert train[:-1] == enc.encode_ordinary("the theme of the thing\n")


def test_gpt2_offline_error(tmp_path):
    (tmp_path / "t.txt").write_text("hello\n" * 100, encoding="utf-8")
    (tmp_path / "cache").mkdir()
    proc = run("prepare_bpe.py", "--input=t.txt", "--tokenizer=gpt2", cwd=tmp_path, ok=False,
               env={"TIKTOKEN_CACHE_DIR": str(tmp_path / "cache")})
    assert "TIKTOKEN_CACHE_DIR" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "data").exists()


@pytest.mark.parametrize("content,why",
                         [(b"", "empty"), (b"abc\x00\x01" * 100, "binary"), (b"caf\xe9 " * 100, "UTF-8")])
def test_bad_input_fails_and_writes_nothing(tmp_path, content, why):
    (tmp_path / "bad.txt").write_bytes(content)
    proc = run("prepare_bpe.py", "--input=bad.txt", cwd=tmp_path, ok=False)
    assert why in proc.stderr and not (tmp_path / "data").exists()


def test_bad_file_met_while_encoding_fails_cleanly(tmp_path, bpe_data):
    """A binary file found by the reader thread mid-corpus: one line, non-zero exit, no dataset left behind."""
    (tmp_path / "docs").mkdir()
    for i in range(5):
        (tmp_path / "docs" / f"{i}.txt").write_text(DOCS["c.txt"], encoding="utf-8")
    (tmp_path / "docs" / "3.txt").write_bytes(b"abc\x00\x01" * 100)
    proc = run("prepare_bpe.py", "--input=docs", f"--tokenizer={bpe_data / 'data/docs_bpe/tokenizer.json'}",
               "--chunk_bytes=100", cwd=tmp_path, ok=False)
    last = proc.stderr.strip().splitlines()[-1]  # after the progress bar
    assert last.startswith("error: ") and "3.txt looks binary" in last and "Traceback" not in proc.stderr
    assert not (tmp_path / "data" / "docs_bpe").exists()


def test_parquet_text_and_tokens_columns(tmp_path, bpe_data):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq
    texts = list(DOCS.values())
    pq.write_table(pa.table({"text": texts}), tmp_path / "docs.parquet", row_group_size=2)
    tj = bpe_data / "data" / "docs_bpe" / "tokenizer.json"
    run("prepare_bpe.py", "--input=docs.parquet", f"--tokenizer={tj}", "--val_fraction=0.25", cwd=tmp_path)
    for split in ("train.bin", "val.bin"):  # same documents, same bins as the folder of files
        expected = (bpe_data / "data" / "docs_bpe" / split).read_bytes()
        assert (tmp_path / "data" / "docs_bpe" / split).read_bytes() == expected
    _, tok = load(bpe_data / "data" / "docs_bpe")
    pq.write_table(pa.table({"tokens": [tok.encode(t) for t in texts]}), tmp_path / "tok.parquet")
    run("prepare_bpe.py", "--input=tok.parquet", f"--tokenizer={tj}", "--val_fraction=0.25", cwd=tmp_path)
    expected = (bpe_data / "data" / "docs_bpe" / "train.bin").read_bytes()
    assert (tmp_path / "data" / "tok_bpe" / "train.bin").read_bytes() == expected


def test_info(bpe_data):
    out = run("prepare_bpe.py", "--info=data/docs_bpe", cwd=bpe_data).stdout
    assert "vocab_size: 400" in out and "uint16" in out and "train_tokens" in out


def test_token_level_train_sample_and_chat(bpe_data):
    """Train on BPE tokens, then sample and chat from out_dir alone (the checkpoint carries the tokenizer)."""
    run("train.py", "--dataset=docs_bpe", "--out_dir=out-bpe", "--max_iters=30", "--eval_interval=30", *TINY,
        "--model_type=gpt_plus", cwd=bpe_data)
    (bpe_data / "data" / "docs_bpe" / "tokenizer.json").rename(bpe_data / "moved.json")  # prove out_dir is enough
    try:
        out = run("sample.py", "--out_dir=out-bpe", "--prompt=First 😀", "--max_new_tokens=20", "--temperature=0",
                  cwd=bpe_data).stdout
        assert out == greedy_text(bpe_data / "out-bpe", "First 😀", 20) and len(out) > len("First 😀\n")
        reply = run("chat.py", "--out_dir=out-bpe", "--max_new_tokens=4", input="héllo 中文\n/history\n",
                    cwd=bpe_data).stdout
        assert "User: héllo 中文\nAssistant:" in reply
    finally:
        (bpe_data / "moved.json").rename(bpe_data / "data" / "docs_bpe" / "tokenizer.json")
    assert (bpe_data / "out-bpe" / "tokenizer.json").is_file()


def test_bits_per_byte_of_a_uniform_model(tmp_path):
    """An untrained model with ~zero weights predicts uniformly: bpb = log2(vocab) * tokens / bytes, exactly
    the 1 byte per token of ASCII and the 2 of Cyrillic."""
    import math
    for name, text, bytes_per_char in [("ascii", "abcdefgh" * 400, 1), ("cyr", "абвгдежз" * 400, 2)]:
        (tmp_path / f"{name}.txt").write_text(text, encoding="utf-8")
        run("prepare_char.py", f"--input={name}.txt", cwd=tmp_path)
        proc = run("train.py", f"--dataset={name}_char", f"--out_dir=out-{name}", "--eval_only=True", "--init_std=1e-7",
                   *TINY, cwd=tmp_path)  # eval_only prints and writes nothing
        bpb = float(proc.stdout.split("val bpb ")[1].split()[0])
        assert bpb == pytest.approx(math.log2(8) / bytes_per_char, rel=1e-4) and not (tmp_path / f"out-{name}").exists()


def test_word_level_tokens_round_trip_train_and_sample(tmp_path):
    """--tokenizer=word: words keep their leading space, so the bins decode back to the text exactly; a word the
    vocabulary lacks becomes <|unk|>; bits per byte count the words' bytes; train and sample as with a BPE."""
    text = "the cat sat on the mat.\n\nThe dog  ate\tthe cat!\n" * 40 + "a rare zebra.\n"
    (tmp_path / "words.txt").write_text(text, encoding="utf-8")
    run("prepare_bpe.py", "--input=words.txt", "--tokenizer=word", "--vocab_size=21", "--val_fraction=0.2",
        cwd=tmp_path)
    folder = tmp_path / "data" / "words_word"
    meta = json.loads((folder / "meta.json").read_text())
    assert meta["word_level"] and meta["vocab_size"] == 21 and meta["tokenizer"] == "bpe"
    sys.path.insert(0, ROOT)
    from tokenizer import load_tokenizer
    tok = load_tokenizer(meta, folder)
    ids = np.concatenate([np.fromfile(folder / f"{s}.bin", dtype=np.uint16) for s in ("train", "val")]).tolist()
    # 14 pieces and 7 specials: BOS/EOS dropped, the 3 words seen once unknown
    assert tok.decode(ids) == text.replace("a rare zebra", "<|unk|>" * 3)
    assert tok.decode(tok.encode(" the cat  sat.\n")) == " the cat  sat.\n"
    sizes = dict(zip(map(tok.tok.id_to_token, range(21)), tok.token_bytes(), strict=True))
    assert sizes[" cat"] == 4 and sizes["<|unk|>"] == 0 and sizes["<|bos|>"] == 0
    run("train.py", "--dataset=words_word", "--out_dir=out-word", "--max_iters=4", "--eval_interval=4", *TINY,
        cwd=tmp_path)
    out = run("sample.py", "--out_dir=out-word", "--prompt=the cat", "--max_new_tokens=10", "--temperature=0",
              cwd=tmp_path).stdout
    assert out == greedy_text(tmp_path / "out-word", "the cat", 10) and len(out) > len("the cat\n")
