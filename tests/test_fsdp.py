"""train.py --parallel=fsdp under torchrun on CPU (gloo, 2 processes): the losses of one process, AdamW and Muon (and
Muon's steps bit for bit), exact resume at the same and at another world size through sharded (DCP) checkpoints, with
the EMA on shards, a one-process ckpt.pt resumed sharded and compiled block by block, half the memory per rank, a
consistent checkpoint on SIGTERM, and sample.py reading the sharded checkpoint."""

import csv
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

from conftest import ROOT, TINY, run

ARGS = [a for a in TINY if not a.startswith("--gradient_accumulation_steps")] + [
    "--dataset=tiny_char", "--gradient_accumulation_steps=4", "--grad_clip=0.5", "--eval_interval=10",
    "--lr_decay_iters=20"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONHASHSEED": "0"}


def torchrun(cwd, *args, nproc=2):
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
                           os.path.join(ROOT, "train.py"), *args], cwd=cwd, capture_output=True, text=True, env=ENV,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def losses(folder):
    with open(folder / "metrics.csv") as f:
        return {int(r["iter"]): float(r["loss"]) for r in csv.DictReader(f) if r["loss"]}


def close(a, b, tol):
    assert a.keys() == b.keys() and all(abs(a[k] - b[k]) <= tol for k in a), (a, b)


@pytest.fixture(scope="module")
def straight(workdir):
    """20 steps with AdamW on 2 sharded processes and on one: their out_dirs, and what the sharded run printed."""
    out = torchrun(workdir, *ARGS, "--max_iters=20", "--parallel=fsdp", "--out_dir=out-fsdp-adamw").stdout
    run("train.py", *ARGS, "--max_iters=20", "--out_dir=out-one-adamw", cwd=workdir, env=ENV)
    return dict(fsdp=workdir / "out-fsdp-adamw", one=workdir / "out-one-adamw", printed=out)


@pytest.mark.parametrize("optimizer,tol", [("adamw", 1e-5), ("muon", 1e-4)])
def test_two_sharded_processes_train_like_one(workdir, straight, optimizer, tol):
    """20 steps (Muon: 8), accumulation and clipping on: the losses of one process on the same total batch. (Muon's
    Newton-Schulz runs in bfloat16, where a last-bit difference in a reduced float32 gradient can flip a rounding:
    over 8 steps the losses agree to 2e-5 on an Intel Xeon and parted by a little more on an AMD EPYC, so 1e-4; on
    equal gradients the steps are equal bit for bit, below.)"""
    if optimizer == "muon":
        args = [*ARGS, "--optimizer=muon", "--max_iters=8"]
        torchrun(workdir, *args, "--parallel=fsdp", "--out_dir=out-fsdp-muon")
        run("train.py", *args, "--out_dir=out-one-muon", cwd=workdir, env=ENV)
    close(losses(workdir / f"out-fsdp-{optimizer}"), losses(workdir / f"out-one-{optimizer}"), tol)
    assert (workdir / f"out-fsdp-{optimizer}" / "ckpt" / "train.pt").is_file()


def muon_on_shards(rank, folder):
    """One of 2 processes: 3 ShardedMuon steps on row-sharded matrices (given the same gradients as one process)."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    from optimizers import ShardedMuon
    dist.init_process_group("gloo", init_method=f"file://{folder}/rendezvous", rank=rank, world_size=2)
    torch.manual_seed(0)
    whole = [torch.randn(96, 32), torch.randn(33, 40)]  # 33 rows: shards of unequal size
    grads = [[torch.randn_like(w) for w in whole] for _ in range(3)]
    mesh = init_device_mesh("cpu", (2,))
    params = [torch.nn.Parameter(distribute_tensor(w, mesh, [Shard(0)])) for w in whole]
    opt = ShardedMuon(params, lr=0.02, weight_decay=0.1, momentum=0.95)
    for step in grads:
        for p, g in zip(params, step, strict=True):
            p.grad = distribute_tensor(g, mesh, [Shard(0)])
        opt.step()
    sharded = [p.detach().full_tensor() for p in params]  # every process takes part in the gather
    if rank == 0:
        torch.save(dict(whole=whole, grads=grads, sharded=sharded), f"{folder}/muon.pt")
    dist.destroy_process_group()


def test_sharded_muon_takes_the_steps_of_torch_muon_bit_for_bit(tmp_path):
    torch.multiprocessing.spawn(muon_on_shards, args=(str(tmp_path),), nprocs=2)
    saved = torch.load(tmp_path / "muon.pt")
    params = [torch.nn.Parameter(w.clone()) for w in saved["whole"]]
    opt = torch.optim.Muon(params, lr=0.02, weight_decay=0.1, momentum=0.95)
    for step in saved["grads"]:
        for p, g in zip(params, step, strict=True):
            p.grad = g
        opt.step()
    assert all(torch.equal(p.detach(), s) for p, s in zip(params, saved["sharded"], strict=True))
    assert not torch.equal(params[0].detach(), saved["whole"][0])  # and they moved


def test_sharded_checkpoints_resume_exactly_at_the_same_and_another_world_size(workdir, straight):
    """10 steps on 2 sharded processes, then 10 more on 2: the straight run's weights bit for bit; or 10 more on one
    process: the losses of 20 straight steps. sample.py and convert.py read the shards. The moving average of the
    weights is kept on the shards, saved and resumed with them: at a decay of 1e-6 it is the weights (its val loss is
    theirs: integer buffers such as the positions are not averaged, they stay put)."""
    from checkpoint import load_source
    torchrun(workdir, *ARGS, "--max_iters=10", "--parallel=fsdp", "--ema_decay=1e-6", "--out_dir=out-fsdp-split")
    evals = [r for r in csv.DictReader(open(workdir / "out-fsdp-split" / "metrics.csv")) if r["val_loss"]]
    assert len(evals) == 2 and all(abs(float(r["val_loss_ema"]) - float(r["val_loss"])) < 1e-5 for r in evals)
    assert run("sample.py", "--out_dir=out-fsdp-split", "--ema=True", "--max_new_tokens=20", cwd=workdir).stdout.strip()
    saved = load_source(str(workdir / "out-fsdp-split"))
    assert saved.ema["n_averaged"] == 10 and all(torch.allclose(saved.ema["module." + k], v, atol=1e-5)
                                                 for k, v in saved.model.items())
    shutil.copytree(workdir / "out-fsdp-split", workdir / "out-hop")
    torchrun(workdir, "--init_from=resume", "--max_iters=20", "--out_dir=out-fsdp-split")
    run("train.py", "--init_from=resume", "--max_iters=20", "--out_dir=out-hop", cwd=workdir, env=ENV)  # 1 process
    close(losses(workdir / "out-hop"), losses(straight["one"]), 1e-5)
    a, b = load_source(str(straight["fsdp"])), load_source(str(workdir / "out-fsdp-split"))
    assert a.state["iter_num"] == b.state["iter_num"] == 20
    assert all(torch.equal(a.model[k], b.model[k]) for k in a.model)
    assert b.ema["n_averaged"] == load_source(str(workdir / "out-hop")).ema["n_averaged"] == 20  # went on
    run("convert.py", "--src=out-hop", "--out_dir=out-hop-whole", cwd=workdir)  # one consolidated ckpt.pt
    whole = load_source(str(workdir / "out-hop-whole"))
    assert all(torch.equal(whole.model[k], v) for k, v in load_source(str(workdir / "out-hop")).model.items())


def test_a_one_process_checkpoint_resumes_sharded(workdir, straight):
    """10 steps in one process (ckpt.pt), 10 more on 2 sharded processes, each block compiled: the losses of 20
    straight steps; the sharded checkpoint replaces ckpt.pt."""
    run("train.py", *ARGS, "--max_iters=10", "--out_dir=out-one-split", cwd=workdir, env=ENV)
    torchrun(workdir, "--init_from=resume", "--max_iters=20", "--parallel=fsdp", "--compile=True",
             "--out_dir=out-one-split")
    close(losses(workdir / "out-one-split"), losses(straight["one"]), 1e-5)
    assert (workdir / "out-one-split" / "ckpt" / "train.pt").is_file()
    assert not (workdir / "out-one-split" / "ckpt.pt").exists()


def test_each_rank_holds_about_half_the_parameters_and_optimizer_state(workdir, straight):
    ddp = torchrun(workdir, *ARGS, "--max_iters=2", "--parallel=ddp", "--out_dir=out-mem-ddp").stdout
    held = {name: float(out.split(" MiB of parameters")[0].split()[-1])
            for name, out in (("ddp", ddp), ("fsdp", straight["printed"]))}
    assert held["fsdp"] <= 0.55 * held["ddp"], held


def test_sigterm_to_the_group_saves_one_consistent_sharded_checkpoint(workdir):
    proc = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                             os.path.join(ROOT, "train.py"), *ARGS, "--max_iters=100000", "--eval_interval=100000",
                             "--parallel=fsdp", "--out_dir=out-fsdp-sig"], cwd=workdir, env=ENV,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics = workdir / "out-fsdp-sig" / "metrics.csv"
    for _ in range(600):  # until both ranks are training
        if metrics.is_file() and len(metrics.read_text().splitlines()) > 5:
            break
        time.sleep(0.1)
    children = subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True, text=True).stdout.split()
    assert len(children) == 2
    for pid in children:
        os.kill(int(pid), signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert "stopped at iter" in err and "by SIGTERM; resume with --init_from=resume" in err
    assert err.count("exitcode  : 143") >= 1 and "exitcode  : 1 " not in err  # every rank: 143
    from checkpoint import load_source
    saved = load_source(str(workdir / "out-fsdp-sig"))  # every shard read back: one consistent checkpoint
    assert saved.state["iter_num"] == int(err.split("stopped at iter ")[1].split()[0])
