"""DPO (dpo.py, posttrain.py): the loss equals TRL's on fixed log-probabilities, the completions' log-probabilities
equal a per-pair forward, and a run on pairs a tiny model cannot yet tell apart learns to prefer the chosen ones
(full weights, and LoRA with the base as its reference), every script loading the result; bad pairs are one line."""

import json
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch

from conftest import TINY, run


def trl_sigmoid_loss(chosen, rejected, ref_chosen, ref_rejected, beta):
    """TRL's DPOTrainer._compute_loss (loss_type sigmoid) on these sequence log-probabilities: one completion token
    per sequence, the model's output standing in as TRL's fused head returns it."""
    trl = pytest.importorskip("trl")
    n = chosen.numel()
    accelerator = SimpleNamespace(device="cpu", gather=lambda t: t, unwrap_model=lambda m: m,
                                  gather_for_metrics=lambda t: t if torch.is_tensor(t) else torch.tensor(t))
    trainer = SimpleNamespace(model=SimpleNamespace(training=True), accelerator=accelerator, aux_loss_enabled=False,
                              ld_alpha=None, precompute_ref_logps=True, f_divergence_type="reverse_kl",
                              loss_types=["sigmoid"], loss_weights=[1.0], beta=beta, label_smoothing=0.0,
                              use_weighting=False, _metrics=defaultdict(lambda: defaultdict(list)),
                              _total_train_tokens=0, _tp_size=1)
    log_probs = torch.cat([chosen, rejected])[:, None]  # (2n, 1): the completion token's log-probability
    outputs = SimpleNamespace(log_probs=log_probs, mean_logits=torch.zeros(2 * n, 1), entropy=torch.zeros(2 * n, 1),
                              is_top1=torch.zeros(2 * n, 1, dtype=torch.bool))
    inputs = dict(input_ids=torch.zeros(2 * n, 2, dtype=torch.long), attention_mask=torch.ones(2 * n, 2),
                  completion_mask=torch.tensor([[0, 1]] * (2 * n)), ref_chosen_logps=ref_chosen,
                  ref_rejected_logps=ref_rejected)
    return trl.DPOTrainer._compute_loss(trainer, lambda **_: outputs, inputs, False)


def test_dpo_loss_equals_trl_and_label_smoothing_is_cdpo():
    from posttrain import dpo_loss
    g = torch.Generator().manual_seed(0)
    chosen, rejected, ref_chosen, ref_rejected = (torch.randn(6, generator=g) * 5 - 20 for _ in range(4))
    for beta in (0.1, 0.5):
        ours, rewards_c, rewards_r = dpo_loss(chosen, rejected, ref_chosen, ref_rejected, beta)
        assert abs(ours.item() - trl_sigmoid_loss(chosen, rejected, ref_chosen, ref_rejected, beta).item()) <= 1e-5
        assert torch.allclose(rewards_c - rewards_r, beta * ((chosen - ref_chosen) - (rejected - ref_rejected)))
    # label smoothing ε (cDPO; TRL 1.x keeps it in other loss types): -(1-ε) log σ(m) - ε log σ(-m), by hand
    margin = 0.1 * ((chosen - ref_chosen) - (rejected - ref_rejected))
    by_hand = -(0.9 * torch.log(torch.sigmoid(margin)) + 0.1 * torch.log(torch.sigmoid(-margin))).mean()
    assert abs(dpo_loss(chosen, rejected, ref_chosen, ref_rejected, 0.1, 0.1)[0].item() - by_hand.item()) <= 1e-6


def test_completion_logps_are_each_pairs_own():
    """The batched, right-padded log-probabilities of each completion equal the sum over a forward of that pair
    alone, counting the completion's tokens only."""
    from model import GPT, GPTConfig
    from posttrain import completion_logps
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=16, vocab_size=30, block_size=32)).eval()
    pairs = [([1, 2, 3], [4, 5], [6]), ([7], [8, 9, 10, 11], [12, 13])]
    with torch.no_grad():
        chosen, rejected = completion_logps(model, pairs, "cpu")
        for b, (p, c, r) in enumerate(pairs):
            for ids, got in ((p + c, chosen[b]), (p + r, rejected[b])):
                logp = model(torch.tensor([ids[:-1]]), torch.zeros(1, len(ids) - 1, dtype=torch.long))[0][0]
                logp = logp.log_softmax(-1)
                want = sum(logp[t - 1, ids[t]] for t in range(len(p), len(ids)))
                assert abs(got.item() - want.item()) <= 1e-5


def write_pairs(path, n, seed=0):
    """Pairs whose chosen reply agrees ("yes, WORD") and whose rejected one refuses ("no, WORD"): a preference the
    tiny base does not have."""
    g = torch.Generator().manual_seed(seed)
    words = ["apple", "river", "stone", "cloud", "green", "table", "light", "sound"]
    rows = [dict(prompt=f"Is {w} a word", chosen=f"yes, {w}", rejected=f"no, {w}")
            for w in (words[i] for i in torch.randint(0, len(words), (n,), generator=g).tolist())]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")


@pytest.fixture(scope="module")
def base(workdir):
    if not (workdir / "out-dpo-base" / "ckpt.pt").exists():
        run("train.py", "--dataset=tiny_char", "--out_dir=out-dpo-base", "--model_type=gpt_plus", "--max_iters=100",
            "--eval_interval=100", *TINY, "--batch_size=8", "--learning_rate=1e-2", cwd=workdir)
    write_pairs(workdir / "pairs.jsonl", 120)
    return workdir


@pytest.mark.parametrize("flags", [["--learning_rate=3e-3"], ["--lora_rank=8", "--learning_rate=2e-2"]],
                         ids=["full", "lora"])
def test_dpo_learns_to_prefer_the_chosen_and_every_script_loads_it(base, flags):
    name = "out-dpo-" + ("lora" if len(flags) > 1 else "full")
    out = run("dpo.py", "--init_from=out-dpo-base", "--data=pairs.jsonl", f"--out_dir={name}", "--max_iters=20",
              "--eval_interval=20", "--batch_size=8", "--warmup_iters=2", "--beta=0.5", "--val_fraction=0.2",
              "--log_interval=10", "--device=cpu", *flags, cwd=base).stdout
    steps = [line for line in out.splitlines() if line.startswith("step ")]  # held-out: at the start, at the end
    accuracy = lambda line: float(line.split("accuracy ")[1].split(",")[0])
    assert accuracy(steps[-1]) >= 0.9 and accuracy(steps[-1]) > accuracy(steps[0])
    saved = torch.load(base / name / "ckpt.pt", weights_only=True)
    assert bool(saved["lora"]) == ("--lora_rank=8" in flags)
    run("sample.py", f"--out_dir={name}", "--max_new_tokens=5", "--prompt=Is ", cwd=base)


def test_bad_pairs_and_settings_are_one_line(base):
    (base / "bad.jsonl").write_text('{"prompt": "x", "chosen": "y"}\n{"prompt": "x", "chosen": "y", "rejected": "z"}\n')
    for flags, word in ((["--data=bad.jsonl"], "line 1"), (["--data=missing.jsonl"], "not found"),
                        (["--data=pairs.jsonl", "--beta=0"], "beta"), ([], "--data")):
        proc = run("dpo.py", "--init_from=out-dpo-base", "--out_dir=out-dpo-bad", *flags, cwd=base, ok=False)
        assert word in proc.stderr and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert not (base / "out-dpo-bad").exists()
