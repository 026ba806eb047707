"""train.py and sample.py end to end on a tiny model: learning, exact resume, safe checkpoints, clear errors."""

import csv
import os

import pytest
import torch

from conftest import TINY, greedy_text, run


def losses(out_dir):
    with open(out_dir / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    return [(r["iter"], r["loss"]) for r in rows if r["loss"]], [(r["iter"],
                                                                  r["val_loss"]) for r in rows if r["val_loss"]]


def test_tiny_run_lowers_the_loss_and_checkpoint_loads_weights_only(workdir):
    run("train.py", "--dataset=tiny_char", "--out_dir=out-learn", "--max_iters=60", "--eval_interval=30", *TINY,
        cwd=workdir)
    _, vals = losses(workdir / "out-learn")
    assert [it for it, _ in vals] == ["0", "30", "60"]
    assert float(vals[-1][1]) < float(vals[0][1]) - 0.8
    ckpt = torch.load(workdir / "out-learn" / "ckpt.pt", weights_only=True)
    assert ckpt["iter_num"] == 60 and "_orig_mod." not in "".join(ckpt["model"])
    assert ckpt["model_config"]["n_layer"] == 2 and ckpt["config"]["dataset"] == "tiny_char"
    for f in ("meta.json", "run_meta.json", "metrics.csv"):
        assert (workdir / "out-learn" / f).is_file()
    proc = run("sample.py", "--out_dir=out-learn", "--ema=True", cwd=workdir, ok=False)  # trained without --ema_decay
    assert "no EMA weights" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1


def test_resume_is_exact(workdir):
    """40 iterations straight == 20 iterations, then resume to 40: identical weights, moving average of the weights
    and logged losses; sample.py --ema=True samples from that average."""
    args = ["--dataset=tiny_char", "--eval_interval=20", "--dropout=0.1", "--lr_decay_iters=40", "--ema_decay=0.99",
            *TINY]
    run("train.py", "--out_dir=out-a", "--max_iters=40", *args, cwd=workdir)
    run("train.py", "--out_dir=out-b", "--max_iters=20", *args, cwd=workdir)
    run("train.py", "--out_dir=out-b", "--max_iters=40", "--init_from=resume", *args, cwd=workdir)
    a, b = (torch.load(workdir / d / "ckpt.pt", weights_only=True) for d in ("out-a", "out-b"))
    assert a["iter_num"] == b["iter_num"] == 40
    for name in a["model"]:
        assert torch.equal(a["model"][name], b["model"][name]), name
    for name in a["ema"]:
        assert torch.equal(a["ema"][name], b["ema"][name]), name
    assert a["ema"]["n_averaged"] == 40 and not torch.equal(a["ema"]["module.lm_head.weight"],
                                                            a["model"]["lm_head.weight"])
    assert losses(workdir / "out-a") == losses(workdir / "out-b")
    assert len(losses(workdir / "out-a")[0]) == 40
    ema_losses = [r["val_loss_ema"] for r in csv.DictReader(open(workdir / "out-b" / "metrics.csv")) if r["val_loss"]]
    assert len(ema_losses) == 3 and all(float(v) > 0 for v in ema_losses)
    same = ["--out_dir=out-b", "--temperature=1.0", "--seed=1", "--max_new_tokens=60", "--prompt=The "]
    assert run("sample.py", *same, "--ema=True", cwd=workdir).stdout != run("sample.py", *same, cwd=workdir).stdout


def test_scratch_refuses_to_overwrite_and_resume_checks_what_it_continues(workdir):
    run("train.py", "--dataset=tiny_char", "--out_dir=out-keep", "--max_iters=4", "--eval_interval=2", *TINY,
        cwd=workdir)
    before = (workdir / "out-keep" / "ckpt.pt").read_bytes()
    base = ["--out_dir=out-keep", "--max_iters=8", *TINY]
    proc = run("train.py", "--dataset=tiny_char", *base, cwd=workdir, ok=False)
    assert "already exists" in proc.stderr and "--init_from=resume" in proc.stderr
    proc = run("train.py", "--dataset=tiny_char", "--init_from=resume", *base, "--n_layer=3", cwd=workdir, ok=False)
    assert "n_layer" in proc.stderr and "differs" in proc.stderr
    proc = run("train.py", "--dataset=pydocs_char", "--init_from=resume", *base, cwd=workdir, ok=False)
    assert "dataset" in proc.stderr
    proc = run("train.py", "--init_from=resume", "--optimizer=muon", *base, cwd=workdir, ok=False)
    assert "optimizer state" in proc.stderr and "'adamw'" in proc.stderr
    proc = run("train.py", "--dataset=tiny_char", f"--init_from={workdir / 'out-keep' / 'ckpt.pt'}", *base,
               cwd=workdir, ok=False)
    assert "already exists" in proc.stderr  # a warm start does not overwrite out_dir either
    assert (workdir / "out-keep" / "ckpt.pt").read_bytes() == before
    # no architecture flags at all: everything comes from the checkpoint
    run("train.py", "--dataset=tiny_char", "--init_from=resume", "--out_dir=out-keep", "--max_iters=6", "--device=cpu",
        "--batch_size=4", "--eval_iters=2", cwd=workdir)
    assert torch.load(workdir / "out-keep" / "ckpt.pt", weights_only=True)["iter_num"] == 6


@pytest.mark.parametrize("argv,word", [(["--dataset=nothing_char"], "python prepare_char.py --input=nothing"),
                                       (["--optimizer=sgd"], "optimizer"),
                                       (["--n_head=3"], "n_head"), (["--block_size=100000"], "block_size"),
                                       (["--device=tpu"], "device"), (["--total_batch_size=1000"], "total_batch_size"),
                                       (["--init_from=resume"], "not found"),
                                       (["--save_optimizer=False", "--parallel=fsdp"], "sharded")])
def test_bad_settings_fail_with_one_line(workdir, argv, word):
    proc = run("train.py", "--dataset=tiny_char", "--out_dir=out-bad", *TINY, *argv, cwd=workdir, ok=False)
    assert word in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    assert not (workdir / "out-bad" / "ckpt.pt").exists()


def test_a_stray_rank_in_the_environment_is_one_line(workdir):
    proc = run("train.py", "--dataset=tiny_char", "--out_dir=out-rank", *TINY, cwd=workdir, ok=False,
               env={"RANK": "16"})  # no WORLD_SIZE: not a process torchrun launched
    assert "torchrun" in proc.stderr and "WORLD_SIZE" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    assert not (workdir / "out-rank").exists()


def test_atomic_save_keeps_the_old_checkpoint(tmp_path, monkeypatch):
    """A save that dies half-way (a full disk) leaves the previous ckpt.pt whole, no temporary file behind, and
    says so in one line."""
    import errno

    import checkpoint
    path = str(tmp_path / "ckpt.pt")
    checkpoint.save_checkpoint({"x": torch.ones(3)}, path)

    def broken_save(obj, f):
        f.write(b"half a checkpoint")
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(SystemExit, match="No space left on device.*previous checkpoint is kept"):
        checkpoint.save_checkpoint({"x": torch.zeros(3)}, path)
    assert torch.equal(torch.load(path, weights_only=True)["x"], torch.ones(3))
    assert os.listdir(tmp_path) == ["ckpt.pt"]


def test_sample_streams_text_from_a_trained_checkpoint(trained):
    workdir, out = trained, "--out_dir=out-tiny"
    a = run("sample.py", out, "--prompt=The ", "--max_new_tokens=50", "--seed=3", "--num_samples=2", cwd=workdir).stdout
    b = run("sample.py", out, "--prompt=The ", "--max_new_tokens=50", "--seed=3", "--num_samples=2", cwd=workdir).stdout
    samples = a[:-1].split("\n" + "-" * 40 + "\n")  # two samples, each the prompt and 50 new characters
    assert a == b and len(samples) == 2 and samples[0] != samples[1]
    assert all(s.startswith("The ") and len(s) == len("The ") + 50 for s in samples)
    (workdir / "p.txt").write_text("class ", encoding="utf-8")
    greedy = run("sample.py", out, "--prompt=FILE:p.txt", "--temperature=0", "--max_new_tokens=20", cwd=workdir).stdout
    assert greedy == greedy_text(workdir / "out-tiny", "class ", 20) and len(greedy) == len("class ") + 20 + 1
    proc = run("sample.py", out, "--prompt=naïve ☃", cwd=workdir, ok=False)
    assert "☃" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    proc = run("sample.py", "--out_dir=missing", cwd=workdir, ok=False)
    assert "not found" in proc.stderr
    (workdir / "broken").mkdir(exist_ok=True)
    (workdir / "broken" / "ckpt.pt").write_bytes(b"not a checkpoint")
    proc = run("sample.py", "--out_dir=broken", cwd=workdir, ok=False)
    assert "not a readable" in proc.stderr


@pytest.mark.parametrize("variant", [["--model_type=gpt_plus"], ["--model_type=gpt_fast"],
                                     ["--model_type=gpt", "--n_kv_head=1", "--qk_norm=True", "--logit_softcap=10"]],
                                     ids=str)
def test_every_preset_resumes_and_samples_with_no_architecture_flags(workdir, variant):
    """The checkpoint remembers the resolved fields: resume and sample need only out_dir."""
    out = f"--out_dir=out-{'-'.join(v.split('=')[1] for v in variant)}"
    run("train.py", "--dataset=tiny_char", out, "--max_iters=3", "--eval_interval=3", *TINY, *variant, cwd=workdir)
    ckpt = torch.load(workdir / out.split("=")[1] / "ckpt.pt", weights_only=True)
    assert ckpt["model_config"]["n_kv_head"] in (1, 2) and ckpt["model_config"]["mlp_hidden"] > 0  # resolved, not None
    run("train.py", out, "--init_from=resume", "--max_iters=5", cwd=workdir)
    text = run("sample.py", out, "--max_new_tokens=30", "--prompt=def ", "--temperature=0", cwd=workdir).stdout
    assert text == greedy_text(workdir / out.split("=")[1], "def ", 30) and len(text) == len("def ") + 31


def test_eval_only_and_resuming_a_finished_run_write_nothing_new(workdir):
    run("train.py", "--dataset=tiny_char", "--out_dir=out-evo", "--max_iters=4", "--eval_interval=2", *TINY,
        cwd=workdir)
    before = {f: (workdir / "out-evo" / f).read_bytes() for f in ("metrics.csv", "run_meta.json", "ckpt.pt")}
    proc = run("train.py", "--out_dir=out-evo", "--init_from=resume", "--eval_only=True", cwd=workdir)
    assert "val loss" in proc.stdout
    assert {f: (workdir / "out-evo" / f).read_bytes() for f in before} == before
    run("train.py", "--out_dir=out-evo", "--init_from=resume", cwd=workdir)  # already at max_iters
    assert (workdir / "out-evo" / "metrics.csv").read_bytes() == before["metrics.csv"]  # no duplicate eval row
    run("train.py", "--out_dir=out-evo", "--init_from=resume", "--max_iters=6", cwd=workdir)
    import json
    info = json.loads((workdir / "out-evo" / "run_meta.json").read_text())
    assert "--max_iters=4" in info["argv"] and [r["iter"] for r in info["resumed"]] == [4, 4]


def test_batched_samples_start_and_prompt(trained):
    """--num_samples=3 draws one batch (three texts, each after the prompt); --start is nanoGPT's name for --prompt."""
    common = ["--out_dir=out-tiny", "--max_new_tokens=12", "--temperature=0", "--device=cpu"]
    a = run("sample.py", *common, "--start=The ", cwd=trained).stdout
    b = run("sample.py", *common, "--prompt=The ", cwd=trained).stdout
    assert a == b == greedy_text(trained / "out-tiny", "The ", 12)
    three = run("sample.py", *common, "--prompt=The ", "--num_samples=3", cwd=trained).stdout
    # greedy: the same text in every row
    assert three.rstrip("\n").split("\n" + "-" * 40 + "\n") == [a.rstrip("\n")] * 3
    varied = run("sample.py", "--out_dir=out-tiny", "--max_new_tokens=30", "--num_samples=3", "--temperature=1.5",
                 "--repetition_penalty=1.3", "--min_p=0.01", "--no_repeat_ngram_size=3", cwd=trained).stdout
    assert len(set(varied.split("\n" + "-" * 40 + "\n"))) == 3


def test_report_describes_runs_and_plots_their_curves(trained, tmp_path):
    proc = run("report.py", "out-tiny", f"--out={tmp_path / 'curves.png'}", cwd=trained)
    assert "out-tiny: gpt 2L 32d" in proc.stdout and "60 iterations, 7,680 tokens seen" in proc.stdout
    assert "val loss: best" in proc.stdout and "bits per byte" in proc.stdout and "ckpt.pt" in proc.stdout
    try:
        import matplotlib  # noqa: F401
        assert (tmp_path / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    except ImportError:
        assert "pip install matplotlib" in proc.stdout
    alone = run("report.py", "out-tiny/ckpt.pt", "--plot=False", cwd=trained).stdout  # a checkpoint file by itself
    assert "60 iterations" in alone and "wrote" not in alone
