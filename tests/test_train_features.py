"""train.py's machinery: DDP under torchrun, Muon's parameter split, LR schedules, exact resume under
Muon and mixed precision, batch arithmetic, out-of-memory back-off, time budgets, save strategies."""

import csv
import json
import os
import runpy
import subprocess
import sys

import pytest
import torch

from conftest import ROOT, TINY, run

BASE = ["--dataset=tiny_char", *TINY]


def rows(out_dir, column):
    with open(out_dir / "metrics.csv") as f:
        return {int(r["iter"]): float(r[column]) for r in csv.DictReader(f) if r[column]}


def test_ddp_two_processes_equal_one(workdir):
    """torchrun with 2 CPU processes (gloo) == 1 process with the same total_batch_size (4 micro-steps of 128 tokens,
    or 2 on each process: accumulation under DDP syncs once per step); only rank 0 writes."""
    args = [*BASE, "--max_iters=6", "--eval_interval=3", "--total_batch_size=512", "--warmup_iters=2"]
    run("train.py", *args, "--out_dir=out-1p", cwd=workdir)
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           os.path.join(ROOT, "train.py"), *args, "--out_dir=out-2p"],
                          cwd=workdir, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "2 process(es) x 2 micro-steps" in proc.stdout and proc.stdout.count("iter 6:") == 1
    one, two = rows(workdir / "out-1p", "loss"), rows(workdir / "out-2p", "loss")
    assert one.keys() == two.keys() and all(abs(one[k] - two[k]) < 1e-5 for k in one)
    val1, val2 = rows(workdir / "out-1p", "val_loss"), rows(workdir / "out-2p", "val_loss")
    assert all(abs(val1[k] - val2[k]) < 1e-5 for k in val1)
    a, b = (torch.load(workdir / d / "ckpt.pt", weights_only=True)["model"] for d in ("out-1p", "out-2p"))
    assert all(torch.allclose(a[k], b[k], atol=1e-5) for k in a)
    assert sorted(os.listdir(workdir / "out-2p")) == sorted(os.listdir(workdir / "out-1p"))


def test_muon_gets_exactly_the_block_matrices(workdir):
    run("train.py", *BASE, "--optimizer=muon", "--max_iters=2", "--out_dir=out-muon-split", cwd=workdir)
    groups = json.loads((workdir / "out-muon-split" / "run_meta.json").read_text())["optimizer_params"]
    matrices = {f"transformer.h.{i}.{m}.weight" for i in range(2) for m in ("attn.c_attn", "attn.c_proj", "mlp.c_fc",
                                                                            "mlp.c_proj")}
    assert set(groups["muon"]) == matrices
    assert "transformer.wte.weight" in groups["adamw"] and "transformer.wpe.weight" in groups["adamw"]
    assert "transformer.h.0.ln_1.weight" in groups["adamw"] and "transformer.h.0.attn.c_attn.bias" in groups["adamw"]
    assert not set(groups["muon"]) & set(groups["adamw"])


@pytest.mark.parametrize("schedule,expected", [
    ("cosine", {1: 1 / 6, 5: 5 / 6, 6: 1.0, 16: 0.55, 26: 0.1}),  # step 15 is halfway through the decay
    ("wsd", {1: 1 / 6, 6: 1.0, 16: 1.0, 21: 0.55, 26: 0.1}),  # warmdown over the last half
])
def test_lr_schedules(workdir, schedule, expected):
    """LR (as a fraction of learning_rate=1e-2, min_lr=1e-3) after warmup_iters=5, decaying over 20 steps."""
    run("train.py", *BASE, f"--lr_schedule={schedule}", "--warmdown_frac=0.5", "--max_iters=26", "--warmup_iters=5",
        "--lr_decay_iters=25", "--learning_rate=1e-2", "--min_lr=1e-3", "--eval_interval=100",
        f"--out_dir=out-{schedule}", cwd=workdir)
    lr = rows(workdir / f"out-{schedule}", "lr")  # the row for iter k holds the LR of step k-1
    for it, frac in expected.items():
        assert lr[it] == pytest.approx(1e-2 * frac, rel=1e-5), (it, lr[it])


@pytest.mark.parametrize("extra", [["--optimizer=muon"], ["--dtype=bfloat16"], ["--dtype=float16"]], ids=str)
def test_resume_is_exact_with_muon_and_mixed_precision(workdir, extra):
    """Muon's momentum, the bf16 autocast path and the float16 GradScaler state all survive a resume."""
    tag = extra[0].split("=")[1]
    args = [*BASE, *extra, "--eval_interval=10", "--lr_decay_iters=20"]
    run("train.py", *args, "--max_iters=20", f"--out_dir=out-{tag}-a", cwd=workdir)
    run("train.py", *args, "--max_iters=10", f"--out_dir=out-{tag}-b", cwd=workdir)
    run("train.py", *args, "--max_iters=20", "--init_from=resume", f"--out_dir=out-{tag}-b", cwd=workdir)
    a, b = (torch.load(workdir / f"out-{tag}-{x}" / "ckpt.pt", weights_only=True) for x in "ab")
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    assert rows(workdir / f"out-{tag}-a", "loss") == rows(workdir / f"out-{tag}-b", "loss")
    if tag == "float16":
        assert a["scaler"]["scale"] == b["scaler"]["scale"] and "_growth_tracker" in b["scaler"]


def test_total_batch_size_sets_accumulation(workdir):
    proc = run("train.py", *BASE, "--total_batch_size=384", "--max_iters=1", "--out_dir=out-tbs", cwd=workdir)
    assert "1 process(es) x 3 micro-steps x 4 x 32 = 384 tokens per step" in proc.stdout
    proc = run("train.py", *BASE, "--total_batch_size=300", "--out_dir=out-tbs2", cwd=workdir, ok=False)
    assert "a multiple of 32" in proc.stderr


@pytest.mark.parametrize("config", sorted(os.listdir(os.path.join(ROOT, "config"))))
def test_every_shipped_config_splits_its_batch_over_1_2_and_8_processes(config):
    """The tokens per step stay those of the config; each process's share divides into micro-batches."""
    from training import split_batch
    scope = dict(batch_size=12, block_size=1024, gradient_accumulation_steps=40, total_batch_size=0)
    exec(open(os.path.join(ROOT, "config", config)).read(), {}, values := {})
    scope.update({k: v for k, v in values.items() if k in scope})
    tokens = (scope["total_batch_size"]
              or scope["gradient_accumulation_steps"] * scope["batch_size"] * scope["block_size"])
    for world in (1, 2, 8):
        micro, steps = split_batch(tokens, scope["batch_size"], scope["block_size"], world)
        assert micro * steps * world * scope["block_size"] == tokens and micro <= scope["batch_size"]


def test_auto_microbatch_backs_off_on_out_of_memory(workdir, monkeypatch, capsys):
    """A fake OOM for micro-batches above 2 sequences, in training and evaluation alike: the run halves batch_size
    and doubles the micro-steps before its first evaluation, then goes on; without auto_microbatch it stops with
    one line."""
    import model
    real_forward = model.GPT.forward

    def forward(self, idx, *a, **kw):
        if idx.size(0) > 2:
            raise torch.OutOfMemoryError("fake: CUDA out of memory")
        return real_forward(self, idx, *a, **kw)
    monkeypatch.setattr(model.GPT, "forward", forward)
    monkeypatch.chdir(workdir)
    monkeypatch.setattr(sys, "argv",
                        ["train.py", *BASE, "--auto_microbatch=True", "--max_iters=3", "--out_dir=out-oom"])
    runpy.run_path(f"{ROOT}/train.py", run_name="__main__")
    out = capsys.readouterr().out
    assert "batch_size=2 x 2 micro-steps" in out and "done: 3 iterations" in out
    assert out.index("batch_size=2 x 2 micro-steps") < out.index("step 0 ")
    monkeypatch.setattr(sys, "argv", ["train.py", *BASE, "--max_iters=3", "--out_dir=out-oom2"])
    with pytest.raises(SystemExit) as stop:
        runpy.run_path(f"{ROOT}/train.py", run_name="__main__")
    message = str(stop.value.code)
    assert message.startswith("error: out of memory at batch_size=4") and "--auto_microbatch=True" in message


def test_bench_step_and_sample_modes(workdir):
    """bench.py times a training step (AdamW, Muon) and sampling on the default device, a table row per variant."""
    step = run("bench.py", "--mode=step", "--runs=1", "--steps=2", "--variants=['', '--optimizer=muon']",
               cwd=workdir).stdout
    assert "| baseline |" in step and "| --optimizer=muon |" in step and "MFU" in step
    sample = run("bench.py", "--mode=sample", "--runs=1", "--new_tokens=5", "--variants=['', '--batch=2']",
                 cwd=workdir).stdout
    assert "| --batch=2 |" in sample and "Bound at batch 1" in sample


def test_max_time_ends_the_run_and_the_schedule(workdir):
    run("train.py", *BASE, "--max_time=3", "--max_iters=100000", "--warmup_iters=2", "--eval_interval=100000",
        "--learning_rate=1e-2", "--min_lr=1e-3", "--out_dir=out-time", cwd=workdir)
    ckpt = torch.load(workdir / "out-time" / "ckpt.pt", weights_only=True)
    lr = rows(workdir / "out-time", "lr")
    assert 3 <= ckpt["train_time"] < 5 and 10 < ckpt["iter_num"] < 100000
    assert lr[max(lr)] == pytest.approx(1e-3, rel=0.2)  # the cosine reached min_lr as the budget ran out


def test_save_strategies_and_early_stopping(workdir):
    args = [*BASE, "--max_iters=30", "--eval_interval=5"]
    run("train.py", *args, "--save_strategy=best", "--out_dir=out-best", cwd=workdir)
    assert (workdir / "out-best" / "best.pt").is_file() and not (workdir / "out-best" / "ckpt.pt").exists()
    run("sample.py", "--out_dir=out-best", "--max_new_tokens=5", cwd=workdir)  # falls back to best.pt
    run("train.py", *args, "--save_strategy=none", "--out_dir=out-none", cwd=workdir)
    assert not list((workdir / "out-none").glob("*.pt"))
    proc = run("train.py", *args, "--learning_rate=0.0", "--warmup_iters=0", "--min_lr=0.0",
               "--early_stopping_patience=2",
               "--out_dir=out-early", cwd=workdir)
    assert "early stop" in proc.stdout and torch.load(workdir / "out-early" / "ckpt.pt",
                                                      weights_only=True)["iter_num"] == 10


def test_warm_start_from_another_checkpoint(workdir):
    run("train.py", *BASE, "--max_iters=5", "--eval_interval=5", "--out_dir=out-src", cwd=workdir)
    src = workdir / "out-src" / "ckpt.pt"
    run("train.py", *BASE, "--max_iters=2", f"--init_from={src}", "--out_dir=out-warm", cwd=workdir)
    proc = run("train.py", *BASE, "--max_iters=2", f"--init_from={src}", "--model_type=gpt_plus", "--out_dir=out-warm2",
               cwd=workdir, ok=False)
    assert "strict_init=False" in proc.stderr
    proc = run("train.py", *BASE, "--max_iters=2", f"--init_from={src}", "--model_type=gpt_plus", "--strict_init=False",
               "--out_dir=out-warm3", cwd=workdir)
    assert "missing keys" in proc.stdout


def test_compile_trains_like_eager_outside_the_clock(workdir, tmp_path):
    """--compile=True: the same losses as eager (to float tolerance), compiled before the clock starts (a step's
    ms/iter is far below the compile time), plain parameter names in the checkpoint; a broken compiler: one line."""
    args = [*BASE, "--max_iters=4", "--eval_interval=4"]
    run("train.py", *args, "--out_dir=out-eager", cwd=workdir)
    proc = run("train.py", *args, "--compile=True", "--out_dir=out-compiled", cwd=workdir)
    compile_s = float(proc.stdout.split("compiled the training step in ")[1].split(" s")[0])
    eager, compiled = rows(workdir / "out-eager", "loss"), rows(workdir / "out-compiled", "loss")
    assert eager.keys() == compiled.keys() and all(abs(eager[k] - compiled[k]) < 1e-3 for k in eager)
    assert rows(workdir / "out-compiled", "ms_per_iter")[1] < compile_s * 1000 / 2
    assert not any(k.startswith("_orig_mod") for k in torch.load(workdir / "out-compiled" / "ckpt.pt",
                                                                 weights_only=True)["model"])
    proc = run("train.py", *args, "--compile=True", "--out_dir=out-nocc", cwd=workdir, ok=False,
               env={"CXX": str(tmp_path / "no-such-compiler"), "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "cache")})
    assert proc.stderr.strip().splitlines()[-1].startswith("error: torch.compile failed")
    assert "--compile=False" in proc.stderr


def test_bench_grid_sweeps_the_product_and_resumes(workdir):
    """A 2x1 grid: two variants, a table best first, a CSV of every run; run again, it runs nothing new."""
    args = "--dataset=tiny_char " + " ".join(TINY) + " --max_iters=3 --eval_interval=3"
    grid = "{'learning_rate': [1e-3, 3e-3], 'n_layer': [1]}"
    first = run("bench.py", f"--args={args}", f"--grid={grid}", "--runs=1", "--results_csv=sweep-test.csv", cwd=workdir)
    lines = [l for l in first.stdout.splitlines() if l.startswith("| --")]
    assert sorted(l.split(" |")[0] for l in lines) == ["| --learning_rate=0.001 --n_layer=1",
                                                       "| --learning_rate=0.003 --n_layer=1"]
    losses = [float(l.split("|")[2]) for l in lines]
    assert losses == sorted(losses)  # best first
    table = (workdir / "sweep-test.csv").read_text()
    again = run("bench.py", f"--args={args}", f"--grid={grid}", "--runs=1", "--results_csv=sweep-test.csv", cwd=workdir)
    assert "run 1/1" not in again.stderr and (workdir / "sweep-test.csv").read_text() == table  # nothing re-run
    assert [l for l in again.stdout.splitlines() if l.startswith("| --")] == lines


def test_dtype_auto_on_a_cpu_picks_bf16_only_where_it_measured_faster(workdir, monkeypatch):
    """On a CPU with bf16 matrix units, auto is bfloat16 for models >= 192 wide on >= 2,048 tokens per micro-step
    (faster there), float32 for narrower models, fewer tokens, inference, or a CPU without the units; a run prints
    the choice and keeps it on resume."""
    import hardware
    monkeypatch.setattr(hardware, "cpu_bf16", lambda: True)
    assert hardware.pick_dtype("auto", "cpu", 384, 4096) == "bfloat16"
    assert hardware.pick_dtype("auto", "cpu", 128, 4096) == hardware.pick_dtype("auto", "cpu", 384, 768) == "float32"
    assert hardware.pick_dtype("auto", "cpu") == hardware.pick_dtype("float32", "cpu", 384, 4096) == "float32"
    args = ["--dataset=tiny_char", "--out_dir=out-auto-bf16", "--n_layer=1", "--n_head=2", "--n_embd=192",
            "--block_size=64", "--batch_size=32", "--gradient_accumulation_steps=1", "--eval_iters=2", "--device=cpu",
            "--max_iters=2", "--eval_interval=2"]
    out = run("train.py", *args, cwd=workdir).stdout
    assert "cpu bfloat16 (auto: 192 wide, 2,048 tokens per micro-step)" in out
    assert torch.load(workdir / "out-auto-bf16" / "ckpt.pt", weights_only=True)["config"]["dtype"] == "bfloat16"
    monkeypatch.setattr(hardware, "cpu_bf16", lambda: False)
    assert hardware.pick_dtype("auto", "cpu", 768, 8192) == "float32"
    assert "cpu bfloat16" in run("train.py", "--out_dir=out-auto-bf16", "--init_from=resume", "--max_iters=3",
                                 cwd=workdir).stdout  # the run keeps its dtype on resume, on any machine
