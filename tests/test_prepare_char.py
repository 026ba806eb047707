"""prepare_char.py: inputs of every kind, exact round trips, and errors that write nothing."""

import json

import numpy as np
import pytest

from conftest import corpus_text, run


def read_split(d, split):
    meta = json.loads((d / "meta.json").read_text(encoding="utf-8"))
    ids = np.fromfile(d / f"{split}.bin", dtype=np.uint16)
    return "".join(meta["vocab"][i] for i in ids), meta


def test_file_round_trips_exactly(tmp_path):
    """The bins decode back to the exact text, with unicode, split at the tail."""
    text = corpus_text()[:5000] + "ünïcødé ✓ 😀\n"
    (tmp_path / "t.txt").write_text(text, encoding="utf-8")
    proc = run("prepare_char.py", "--input=t.txt", "--val_fraction=0.2", cwd=tmp_path)
    d = tmp_path / "data" / "t_char"
    train, meta = read_split(d, "train")
    val, _ = read_split(d, "val")
    assert train + val == text
    assert len(val) == len(text) - int(len(text) * 0.8)
    assert meta["vocab_size"] == len(set(text)) == len(meta["vocab"]) and meta["dtype"] == "uint16"
    assert meta["train_tokens"] == len(train) and meta["val_bytes"] == len(val.encode("utf-8"))
    assert "wrote" in proc.stdout


def test_folder_and_random_split(tmp_path):
    """A folder's *.txt files are read in sorted order; split=random holds out whole chunks, seeded."""
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "b.txt").write_text("second file\n" * 300, encoding="utf-8")
    (tmp_path / "docs" / "a.txt").write_text("first file\n" * 300, encoding="utf-8")
    (tmp_path / "docs" / "skip.md").write_text("not text input", encoding="utf-8")
    text = "first file\n" * 300 + "second file\n" * 300
    args = ["--input=docs", "--split=random", "--chunk_size=300", "--val_fraction=0.25"]  # 6900 = 23 chunks
    run("prepare_char.py", *args, cwd=tmp_path)
    d = tmp_path / "data" / "docs_char"
    train, meta = read_split(d, "train")
    val, _ = read_split(d, "val")
    pieces = lambda s: [s[i:i + 300] for i in range(0, len(s), 300)]
    assert len(val) == 6 * 300 and "N" not in meta["vocab"]  # skip.md was not read
    assert sorted(pieces(text)) == sorted(pieces(train) + pieces(val))
    assert train != text[:len(train)]  # not the tail split
    first = (d / "val.bin").read_bytes()
    run("prepare_char.py", *args, cwd=tmp_path)  # same seed, same split
    assert (d / "val.bin").read_bytes() == first


def test_builtin_pydocs(tmp_path):
    run("prepare_char.py", cwd=tmp_path)
    meta = json.loads((tmp_path / "data" / "pydocs_char" / "meta.json").read_text(encoding="utf-8"))
    assert 400_000 < meta["train_tokens"] + meta["val_tokens"] < 600_000 and 80 < meta["vocab_size"] < 130


@pytest.mark.parametrize("content,why", [(b"", "empty"), (b"   \n\n", "empty"), (b"abc\x00\x01\x02" * 100, "binary"),
                                         (b"caf\xe9 latin-1 " * 100, "UTF-8"), (b"ab", "too small")])
def test_bad_input_fails_and_writes_nothing(tmp_path, content, why):
    (tmp_path / "bad.txt").write_bytes(content)
    proc = run("prepare_char.py", "--input=bad.txt", cwd=tmp_path, ok=False)
    assert why in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "data").exists()


def test_missing_input_and_unreachable_url(tmp_path):
    proc = run("prepare_char.py", "--input=nope.txt", cwd=tmp_path, ok=False)
    assert "nope.txt" in proc.stderr
    proc = run("prepare_char.py", "--input=http://127.0.0.1:9/corpus.txt", cwd=tmp_path, ok=False)
    assert "could not download" in proc.stderr and "--input=FILE" in proc.stderr
    assert not (tmp_path / "data").exists()


def test_refuses_to_replace_another_source(tmp_path):
    (tmp_path / "a.txt").write_text("hello world\n" * 100, encoding="utf-8")
    (tmp_path / "b.txt").write_text("other words\n" * 100, encoding="utf-8")
    run("prepare_char.py", "--input=a.txt", "--out_dir=data/x", cwd=tmp_path)
    before = (tmp_path / "data" / "x" / "train.bin").read_bytes()
    proc = run("prepare_char.py", "--input=b.txt", "--out_dir=data/x", cwd=tmp_path, ok=False)
    assert "already holds" in proc.stderr
    assert (tmp_path / "data" / "x" / "train.bin").read_bytes() == before
    run("prepare_char.py", "--input=a.txt", "--out_dir=data/x", cwd=tmp_path)  # the same source may be redone


def test_sanitize_collapse_and_lowercase(tmp_path):
    """--sanitize=basic maps typographic characters to ASCII and drops control and invisible ones; the two other
    options collapse whitespace and lowercase; meta.json records them; the bins decode to the cleaned text."""
    raw = "\u201cHello\u201d \u2014 it\u2019s\u00a0fine\u2026\x07\r\nA \t  B\n\n\n\nEnd \u200bX\n"
    (tmp_path / "t.txt").write_text(raw * 20, encoding="utf-8", newline="")
    run("prepare_char.py", "--input=t.txt", "--sanitize=basic", "--collapse_whitespace=True", "--lowercase=True",
        cwd=tmp_path)
    d = tmp_path / "data" / "t_char"
    meta = json.loads((d / "meta.json").read_text())
    text = "".join(meta["vocab"][i] for s in ("train", "val") for i in np.fromfile(d / f"{s}.bin", dtype=np.uint16))
    assert text == "\"hello\" - it's fine...\na b\n\nend x\n" * 20
    assert (meta["sanitize"], meta["collapse_whitespace"], meta["lowercase"]) == ("basic", True, True)
