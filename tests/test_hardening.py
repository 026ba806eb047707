"""Hostile inputs to every script: each gets one clear line, exit 1, no traceback, and nothing already on disk
changed (the shared writer and loader in dataset.py and checkpoint.py handle most of them once)."""

import ast
import glob
import json
import os
import shutil
import subprocess
import sys

import pytest

from conftest import ROOT, TINY, run


def one_line(proc, *words):
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 1 and len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    for word in words:
        assert word in lines[0], lines[0]
    return lines[0]


def snapshot(folder):
    return {p: open(p, "rb").read() for p in glob.glob(f"{folder}/**", recursive=True) if os.path.isfile(p)}


def test_no_import_cycle_and_no_script_imports_a_script():
    """Shared code lives in modules: a script (a file with a __main__ block) is never imported, and no two modules
    import each other, at the top or inside a function."""
    files = {os.path.basename(f)[:-3]: open(f, encoding="utf-8").read() for f in glob.glob(os.path.join(ROOT, "*.py"))}
    scripts = {name for name, text in files.items() if "__main__" in text}
    edges = {}
    for name, text in files.items():
        deps = set()
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, ast.Import):
                deps |= {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                deps.add(node.module.split(".")[0])
        edges[name] = (deps & set(files)) - {name}
    assert not {(a, b) for a in edges for b in edges[a] if b in scripts}

    def reaches(start, goal, seen=()):
        return any(b == goal or (b not in seen and reaches(b, goal, (*seen, b))) for b in edges[start])
    assert not [name for name in files if reaches(name, name)]


def test_reading_a_checkpoint_loads_no_distributed_machinery():
    """checkpoint.py owns sharded (DCP) checkpoints too, but a script that only reads a whole one, to sample from it,
    does not import FSDP, DTensor or DCP (they cost ~0.5 s of every start)."""
    code = ("import sys, checkpoint, generate; print(sorted(m for m in sys.modules if m.startswith(("
            "'torch.distributed.fsdp', 'torch.distributed.checkpoint', 'torch.distributed.tensor'))))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


@pytest.mark.parametrize("script,args", [("prepare_char.py", ["--input=tiny.txt"]),
                                         ("prepare_bpe.py", ["--input=tiny.txt", "--vocab_size=300"]),
                                         ("convert.py", ["--src=out-tiny"]),
                                         ("train.py", ["--dataset=tiny_char", "--max_iters=2", *TINY])])
def test_an_out_dir_that_is_a_file(trained, script, args):
    (trained / "a-file").write_text("precious")
    one_line(run(script, *args, "--out_dir=a-file", cwd=trained, ok=False), "a-file")
    assert (trained / "a-file").read_text() == "precious"


def full_disk(path):
    """Make writing path's temporary file fail as on a full disk: it is a link to /dev/full."""
    os.symlink("/dev/full", str(path) + ".tmp")


@pytest.mark.parametrize("script", ["prepare_char.py", "prepare_bpe.py"])
def test_a_full_disk_while_preparing_keeps_the_dataset_and_leaves_no_tmp(tmp_path, script):
    (tmp_path / "docs").mkdir()
    for i in range(4):
        (tmp_path / "docs" / f"{i}.txt").write_text(f"document {i}: some text to prepare, twice over. " * 50)
    args = ["--input=docs", "--out_dir=data/t", *(["--vocab_size=300"] if "bpe" in script else [])]
    run(script, *args, cwd=tmp_path)
    before = snapshot(tmp_path / "data" / "t")
    full_disk(tmp_path / "data" / "t" / "train.bin")
    proc = run(script, *args, cwd=tmp_path, ok=False)
    one_line(proc, "could not write", "free some space")
    assert snapshot(tmp_path / "data" / "t") == before and not glob.glob(str(tmp_path / "data" / "t" / "*.tmp"))


@pytest.fixture
def read_only(tmp_path):
    """A read-only filesystem (a tmpfs mounted ro), where the test may mount one."""
    folder = tmp_path / "ro"
    folder.mkdir()
    if os.geteuid() or subprocess.run(["mount", "-t", "tmpfs", "-o", "ro", "tmpfs", str(folder)],
                                      capture_output=True).returncode:
        pytest.skip("cannot mount a read-only filesystem here")
    yield folder
    subprocess.run(["umount", str(folder)])


def test_a_read_only_filesystem(read_only, tmp_path):
    (tmp_path / "t.txt").write_text("some text to prepare, twice over. " * 200)
    one_line(run("prepare_char.py", "--input=t.txt", f"--out_dir={read_only}/d", cwd=tmp_path, ok=False), "writable")
    one_line(run("prepare_bpe.py", "--input=t.txt", f"--out_dir={read_only}/d", cwd=tmp_path, ok=False), "writable")


def test_a_first_save_on_a_full_disk_does_not_promise_a_previous_checkpoint(workdir):
    (workdir / "out-full").mkdir()
    full_disk(workdir / "out-full" / "ckpt.pt")
    proc = run("train.py", "--dataset=tiny_char", "--out_dir=out-full", "--max_iters=2", "--eval_interval=2", *TINY,
               cwd=workdir, ok=False)
    line = one_line(proc, "No space left", "nothing was saved")
    assert "previous checkpoint" not in line and not os.path.exists(workdir / "out-full" / "ckpt.pt")


def test_a_tokenizer_json_that_parses_but_cannot_tokenize_is_refused_at_import(trained, tmp_path):
    run("convert.py", "--out_dir=out-tiny", "--to=hf", f"--dest={tmp_path / 'hf'}", cwd=trained)
    (tmp_path / "hf" / "tokenizer.json").write_text(json.dumps({"version": "1.0", "model": {"type": "BPE"}}))
    one_line(run("convert.py", f"--src=hf:{tmp_path / 'hf'}", f"--out_dir={tmp_path / 'imp'}", cwd=trained, ok=False),
             "tokenizer.json")
    assert not (tmp_path / "imp").exists()
    one_line(run("sample.py", f"--init_from=hf:{tmp_path / 'hf'}", "--max_new_tokens=3", cwd=trained, ok=False),
             "tokenizer.json")


def test_an_export_dest_that_is_a_file(trained):
    (trained / "dest-file").write_text("precious")
    one_line(run("convert.py", "--out_dir=out-tiny", "--to=hf", "--dest=dest-file", cwd=trained, ok=False), "dest-file")
    assert (trained / "dest-file").read_text() == "precious"


def test_report_on_a_damaged_metrics_csv_and_a_png_in_a_missing_folder(trained, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(trained / "out-tiny", run_dir)
    one_line(run("report.py", str(run_dir), f"--out={tmp_path}/no/such/curves.png", cwd=trained, ok=False), "no/such")
    with open(run_dir / "metrics.csv", "a") as f:
        f.write("61,abc,,,,,,,,,,\n")
    one_line(run("report.py", str(run_dir), "--plot=False", cwd=trained, ok=False), "abc", "line")


def test_bench_refuses_an_unknown_variant_field_and_a_corpus_folder_that_holds_files(tmp_path):
    one_line(run("bench.py", "--mode=step", "--variants=['', '--n_layers=3']", cwd=tmp_path, ok=False), "n_layers")
    (tmp_path / "corpus").mkdir()
    (tmp_path / "corpus" / "0000000.txt").write_text("mine")
    one_line(run("bench_prepare.py", "--mode=corpus", "--corpus_mb=1", "--args=corpus", cwd=tmp_path, ok=False),
             "holds")
    assert os.listdir(tmp_path / "corpus") == ["0000000.txt"]
    assert (tmp_path / "corpus" / "0000000.txt").read_text() == "mine"


def test_a_seed_beyond_64_bits(trained):
    one_line(run("sample.py", "--out_dir=out-tiny", f"--seed={2**64}", cwd=trained, ok=False), "seed")
    one_line(run("train.py", "--dataset=tiny_char", "--out_dir=out-seed", f"--seed={2**70}", *TINY, cwd=trained,
                 ok=False), "seed")
    out = run("chat.py", "--out_dir=out-tiny", input=f"/set seed={2**64}\n/set seed=-1\n/set seed=7\n",
              cwd=trained).stdout
    assert out.count("(/set seed=") == 2 and "(seed = 7)" in out


def test_a_character_chat_whose_text_holds_the_end_character(tmp_path):
    lines = [{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "end \u2404 here"}]},
             {"messages": [{"role": "user", "content": "yo"}, {"role": "assistant", "content": "fine"}]}]
    (tmp_path / "c.jsonl").write_text("\n".join(json.dumps(line) for line in lines))
    one_line(run("prepare_char.py", "--input=c.jsonl", cwd=tmp_path, ok=False), "\u2404", "conversation 1")
    assert not (tmp_path / "data").exists()


def test_recommend_on_too_small_a_dataset_gives_advice_it_can_follow(tmp_path):
    (tmp_path / "t.txt").write_text("abcdefgh" * 40)
    run("prepare_char.py", "--input=t.txt", cwd=tmp_path)
    line = one_line(run("recommend.py", "--dataset=t_char", cwd=tmp_path, ok=False), "larger corpus")
    assert "--block_size" not in line
