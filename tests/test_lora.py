"""LoRA (lora.py, train.py --lora_rank): adapters that merge into the base with the same logits, only they train,
a frozen base in bfloat16 or int8, a run folder of adapters only that every script loads (its base checked by digest),
an exact resume, a PEFT export that peft + transformers run with our logits, and a task the frozen base cannot do."""

import os

import pytest
import torch

from conftest import TINY, load, run

SETTINGS = dict(lora_rank=4, lora_alpha=8.0, lora_dropout=0.0, lora_targets="attn,mlp,head", lora_base="")


def tiny(tie):
    from model import GPT, config_from_preset
    torch.manual_seed(0)
    return GPT(config_from_preset("gpt_plus", vocab_size=50, block_size=16, n_layer=2, n_head=2, n_embd=32,
                                  tie_weights=tie))


@pytest.mark.parametrize("tie", [False, True], ids=["untied", "tied"])
def test_adapters_merge_with_the_same_logits_and_only_they_train(tie):
    from lora import adapters, attach, merged
    from model import GPT, config_from_dict
    model = tiny(tie)
    base = {k: v.clone() for k, v in model.state_dict().items()}
    trainable = attach(model, SETTINGS)
    assert trainable == sum(p.numel() for n, p in model.named_parameters() if ".lora_" in n) > 0
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.normal_(0, 0.2)  # B is zero at the start: make the update count
    x = torch.randint(0, 50, (2, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours = model(x, x)[0]
    config, weights = merged(vars(model.config), base, dict(rank=4, alpha=8.0), adapters(model))
    plain = GPT(config_from_dict(config))
    plain.load_state_dict(weights)
    with torch.no_grad():
        assert (plain(x, x)[0] - ours).abs().max().item() <= 1e-5
    before = {k: v.clone() for k, v in model.state_dict().items()}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.1)
    model(x, x, return_logits=False)[1].backward()  # the chunked loss reads the adapted head's weight
    opt.step()
    changed = {k for k, v in model.state_dict().items() if not torch.equal(v, before[k])}
    assert changed == set(adapters(model))


def test_a_bfloat16_or_int8_base_keeps_the_logits_close_in_less_memory():
    from lora import attach
    x = torch.randint(0, 50, (2, 16), generator=torch.Generator().manual_seed(1))
    sizes, logits = {}, {}
    for kind in ("", "bfloat16", "int8"):
        model = tiny(True)
        attach(model, dict(SETTINGS, lora_base=kind))
        sizes[kind] = sum(b.nbytes for b in model.buffers() if b is not None and b.dim() == 2)
        logits[kind], loss = model(x, x)
        loss.backward()  # gradients reach the adapters through the frozen, dequantized matrices
        assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
    spread = (logits[""].max() - logits[""].min()).item()
    assert (logits["bfloat16"] - logits[""]).abs().max().item() < 0.02 * spread
    assert (logits["int8"] - logits[""]).abs().max().item() < 0.02 * spread
    assert sizes["bfloat16"] <= 0.51 * sizes[""] and sizes["int8"] <= 0.3 * sizes[""]


def test_int8_rows_are_the_same_quantized_a_slab_at_a_time(monkeypatch):
    import lora
    w = torch.randn(50, 32, generator=torch.Generator().manual_seed(2)) * torch.linspace(0.1, 3, 50)[:, None]
    q, scale = lora.stored(w, "int8")
    monkeypatch.setattr(lora, "SLAB", 7)  # an embedding's rows go a slab at a time, into one int8 tensor
    assert all(torch.equal(a, b) for a, b in zip((q, scale), lora.stored(w, "int8"), strict=True))
    assert q.dtype == torch.int8 and q.abs().amax(dim=1).eq(127).all()  # each row's largest at 127
    assert ((q.float() * scale[:, None] - w).abs() <= scale[:, None] / 2 + 1e-6).all()  # off by half a step at most


@pytest.fixture(scope="module")
def base(workdir):
    """workdir with out-lora-base: a tiny gpt_plus (Llama layout) char model, the base the LoRA runs adapt."""
    if not (workdir / "out-lora-base" / "ckpt.pt").exists():
        run("train.py", "--dataset=tiny_char", "--out_dir=out-lora-base", "--model_type=gpt_plus", "--max_iters=300",
            "--eval_interval=300", *TINY, "--batch_size=8", "--learning_rate=1e-2", "--min_lr=1e-3", cwd=workdir)
    return workdir


LORA = ["--init_from=out-lora-base", "--dataset=tiny_char", "--lora_rank=4", "--eval_interval=4", "--lr_decay_iters=8",
        "--learning_rate=1e-2", "--warmup_iters=0", "--batch_size=4", "--gradient_accumulation_steps=2",
        "--eval_iters=2", "--device=cpu"]


def test_lora_run_saves_adapters_only_resumes_exactly_and_loads_everywhere(base):
    run("train.py", *LORA, "--max_iters=8", "--out_dir=out-lora-8", cwd=base)
    run("train.py", *LORA, "--max_iters=4", "--out_dir=out-lora-r", cwd=base)
    run("train.py", "--init_from=resume", "--max_iters=8", "--out_dir=out-lora-r", cwd=base)
    straight, resumed = (torch.load(base / d / "ckpt.pt", weights_only=True) for d in ("out-lora-8", "out-lora-r"))
    assert set(straight["model"]) == {k for k in straight["model"] if ".lora_" in k} and straight["lora"]["rank"] == 4
    assert all(torch.equal(straight["model"][k], resumed["model"][k]) for k in straight["model"])
    assert os.path.getsize(base / "out-lora-8" / "ckpt.pt") < 0.5 * os.path.getsize(base / "out-lora-base" / "ckpt.pt")
    out = run("sample.py", "--out_dir=out-lora-8", "--max_new_tokens=20", "--temperature=0", "--prompt=The ",
              cwd=base).stdout
    merged, _ = load(base / "out-lora-8")
    plain, _ = load(base / "out-lora-base")
    x = torch.randint(0, merged.config.vocab_size, (1, 20), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert not torch.allclose(merged(x)[0], plain(x)[0])  # the adapters count
    assert out.startswith("The ")
    run("eval.py", "--out_dir=out-lora-8", "--text=tiny.txt", cwd=base)


def test_a_lora_run_without_its_optimizer_state_is_a_third_the_size_and_resumes(base):
    for out_dir, keep in (("out-lora-s", False), ("out-lora-w", True)):
        run("train.py", *LORA, "--max_iters=4", f"--out_dir={out_dir}", f"--save_optimizer={keep}", cwd=base)
    small, whole = (torch.load(base / d / "ckpt.pt", weights_only=True) for d in ("out-lora-s", "out-lora-w"))
    adapter_bytes = sum(t.nbytes for t in small["model"].values())
    assert small["optimizers"] is None and whole["optimizers"]
    assert os.path.getsize(base / "out-lora-w" / "ckpt.pt") - os.path.getsize(base / "out-lora-s" / "ckpt.pt") >= \
        2 * adapter_bytes  # AdamW's two moments of each adapter are what a whole checkpoint adds
    out = run("train.py", "--init_from=resume", "--max_iters=6", "--out_dir=out-lora-s", cwd=base).stdout
    assert "no optimizer state" in out and torch.load(base / "out-lora-s" / "ckpt.pt")["iter_num"] == 6


def test_a_base_that_changed_under_its_adapters_is_one_line(base, tmp_path):
    import shutil
    shutil.copytree(base / "data", tmp_path / "data")
    shutil.copytree(base / "out-lora-base", tmp_path / "out-lora-base")
    run("train.py", *LORA, "--max_iters=2", "--out_dir=out-l", cwd=tmp_path)
    run("train.py", "--dataset=tiny_char", "--out_dir=out-lora-base", "--model_type=gpt_plus", "--max_iters=2",
        "--eval_interval=2", "--overwrite=True", *TINY, cwd=tmp_path)  # another base in the same place
    proc = run("sample.py", "--out_dir=out-l", "--max_new_tokens=5", cwd=tmp_path, ok=False)
    assert "digest" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("flags,word", [(["--optimizer=muon"], "AdamW"), (["--init_from=scratch"], "trained model"),
                                        (["--lora_targets=attn,emb"], "lora_targets"), (["--lora_base=int4"], "int8"),
                                        (["--parallel=fsdp"], "FSDP")])
def test_lora_settings_that_do_not_go_are_one_line(base, flags, word):
    proc = run("train.py", *LORA, "--max_iters=2", "--out_dir=out-lora-bad", *flags, cwd=base, ok=False)
    assert word in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    assert not (base / "out-lora-bad" / "ckpt.pt").exists()


def test_peft_runs_the_exported_adapters_with_our_logits(base):
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    run("train.py", *LORA, "--max_iters=6", "--out_dir=out-lora-peft", "--lora_targets=attn,mlp,head", cwd=base)
    run("convert.py", "--out_dir=out-lora-base", "--to=hf", "--dest=hf-lora-base", cwd=base)
    run("convert.py", "--out_dir=out-lora-peft", "--to=peft", "--dest=peft-adapter", cwd=base)
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(base / "hf-lora-base"))
    adapted = peft.PeftModel.from_pretrained(hf, str(base / "peft-adapter")).eval()
    ours, _ = load(base / "out-lora-peft")
    x = torch.randint(0, ours.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert (adapted(x).logits - ours(x, x)[0]).abs().max().item() <= 1e-5
    proc = run("convert.py", "--out_dir=out-lora-base", "--to=peft", "--dest=peft-none", cwd=base, ok=False)
    assert "no LoRA adapters" in proc.stderr
    run("convert.py", "--out_dir=out-lora-peft", "--to=hf", "--dest=hf-lora-merged", cwd=base)  # merged, untied head
    merged = transformers.AutoModelForCausalLM.from_pretrained(str(base / "hf-lora-merged")).eval()
    with torch.no_grad():
        assert (merged(x).logits - ours(x, x)[0]).abs().max().item() <= 1e-5


def test_lora_under_ddp_takes_the_steps_of_one_process(base):
    """torchrun with 2 CPU processes (gloo): the frozen base needs no gradient sync, the adapters end as one process's
    (the same total_batch_size)."""
    import subprocess
    import sys

    from conftest import ROOT
    args = [*LORA, "--max_iters=4", "--total_batch_size=256"]
    run("train.py", *args, "--out_dir=out-lora-1p", cwd=base)
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           os.path.join(ROOT, "train.py"), *args, "--out_dir=out-lora-2p"], cwd=base,
                          capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    one, two = (torch.load(base / d / "ckpt.pt", weights_only=True)["model"] for d in ("out-lora-1p", "out-lora-2p"))
    assert one.keys() == two.keys() and all(torch.allclose(one[k], two[k], atol=1e-5) for k in one)


def test_lora_learns_what_the_frozen_base_cannot(base):
    """Adapters of rank 8 on a tiny base, trained on one fact it never saw, complete it greedily; the base does not."""
    from conftest import greedy_text
    (base / "fact.txt").write_text("the secret word is zebra.\n" * 400, encoding="utf-8")
    run("prepare_char.py", "--input=fact.txt", "--vocab_from=data/tiny_char", cwd=base)
    prompt = "the secret word is "
    assert "zebra" not in greedy_text(base / "out-lora-base", prompt, 8)
    run("train.py", "--init_from=out-lora-base", "--dataset=fact_char", "--out_dir=out-lora-fact", "--lora_rank=8",
        "--lora_alpha=16", "--max_iters=200", "--eval_interval=200", "--learning_rate=3e-2", "--warmup_iters=5",
        "--batch_size=8", "--gradient_accumulation_steps=1", "--eval_iters=2", "--device=cpu", cwd=base)
    assert greedy_text(base / "out-lora-fact", prompt, 8).startswith(prompt + "zebra.")
