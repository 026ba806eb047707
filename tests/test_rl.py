"""rl.py (GRPO with verifiable rewards) and its parts in posttrain.py: the policy-gradient loss and the group-relative
advantages against hand computations, a reward that prefers one character raising its share within a few steps,
exact resume, the built-in arithmetic task, and a reward file that raises or returns a non-number as one line."""

import csv

import pytest
import torch

from conftest import TINY, run


def test_policy_loss_and_advantages_equal_hand_computation():
    from posttrain import group_advantages, policy_loss
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 2.0, 2.0])  # two groups of three
    adv = group_advantages(rewards, 3)
    for g in range(2):
        r = rewards[3 * g:3 * g + 3]
        want = (r - r.mean()) / r.std() if r.std() > 0 else torch.zeros(3)
        assert torch.allclose(adv[3 * g:3 * g + 3], want)
    g = torch.Generator().manual_seed(0)
    logps, ref = -torch.rand(6, 5, generator=g), -torch.rand(6, 5, generator=g)
    mask = (torch.rand(6, 5, generator=g) > 0.3).float()
    total, count = 0.0, 0
    for i in range(6):
        for t in range(5):
            if mask[i, t]:
                d = ref[i, t] - logps[i, t]
                total += -adv[i] * logps[i, t] + 0.1 * (torch.exp(d) - d - 1)
                count += 1
    assert abs(policy_loss(logps, mask, adv, ref, 0.1).item() - total.item() / count) <= 1e-6
    assert abs(policy_loss(logps, mask, adv).item() - (-(adv[:, None] * logps * mask).sum() / mask.sum()).item()) < 1e-6


@pytest.fixture(scope="module")
def base(workdir):
    """A tiny char model (the base of the RL runs), prompts, and a reward that counts one character's share."""
    if not (workdir / "out-rl-base" / "ckpt.pt").exists():
        run("train.py", "--dataset=tiny_char", "--out_dir=out-rl-base", "--model_type=gpt_plus", "--max_iters=100",
            "--eval_interval=100", *TINY, "--batch_size=8", "--learning_rate=1e-2", cwd=workdir)
    (workdir / "prompts.jsonl").write_text("".join(
        f'{{"messages": [{{"role": "user", "content": "Write about {w}"}}], "letter": "e"}}\n'
        for w in ("lists", "tuples", "sets", "loops", "files", "names", "types", "calls") * 5), encoding="utf-8")
    (workdir / "share.py").write_text("def reward(prompt, completion, letter, **_):\n"
                                      "    return completion.count(letter) / max(len(completion), 1)\n")
    return workdir


ARGS = ["--init_from=out-rl-base", "--task=prompts.jsonl", "--reward=share.py", "--num_samples=8",
        "--prompts_per_step=4", "--max_new_tokens=16", "--eval_prompts=4", "--eval_interval=100", "--device=cpu"]


def rewards(folder):
    with open(folder / "metrics.csv") as f:
        return [float(r["reward"]) for r in csv.DictReader(f) if r["reward"]]


def test_a_reward_for_one_character_raises_its_share(base):
    run("rl.py", *ARGS, "--max_iters=12", "--learning_rate=3e-3", "--out_dir=out-rl-e", cwd=base)
    r = rewards(base / "out-rl-e")
    assert sum(r[-3:]) / 3 > 1.5 * sum(r[:3]) / 3 and sum(r[-3:]) / 3 > 0.2  # 'e' is ~10% of the base's characters


def test_rl_resumes_exactly(base):
    flat = ["--learning_rate=3e-3", "--min_lr=3e-3", "--eval_interval=2"]  # (a schedule that max_iters does not move)
    run("rl.py", *ARGS, *flat, "--max_iters=4", "--out_dir=out-rl-4", cwd=base)
    run("rl.py", *ARGS, *flat, "--max_iters=2", "--out_dir=out-rl-r", cwd=base)
    run("rl.py", "--init_from=resume", "--out_dir=out-rl-r", "--max_iters=4", cwd=base)  # the rest from the checkpoint
    a, b = (torch.load(base / d / "ckpt.pt", weights_only=True)["model"] for d in ("out-rl-4", "out-rl-r"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_the_arithmetic_recipe_sft_then_lora_rl_and_dpo(base):
    """prepare_char.py --input=arithmetic, a few SFT steps, then rl.py and dpo.py on the built-in sums (the recipe of
    config/sft_arith.py and config/rl_arith.py, in miniature); a model without '?' is one line."""
    run("prepare_char.py", "--input=arithmetic", cwd=base)
    run("train.py", "--dataset=arithmetic_char", "--out_dir=out-sft-arith", "--max_iters=20", "--eval_interval=20",
        *TINY, "--block_size=48", cwd=base)
    out = run("rl.py", "--init_from=out-sft-arith", "--task=arithmetic", "--max_iters=1", "--num_samples=2",
              "--prompts_per_step=2", "--max_new_tokens=4", "--eval_prompts=4", "--lora_rank=4", "--device=cpu",
              "--out_dir=out-rl-arith", cwd=base).stdout
    assert "held-out pass@1" in out and "rollouts" in out
    assert torch.load(base / "out-rl-arith" / "ckpt.pt", weights_only=True)["lora"]["rank"] == 4
    out = run("dpo.py", "--init_from=out-sft-arith", "--data=arithmetic", "--max_iters=1", "--eval_interval=1",
              "--device=cpu", "--out_dir=out-dpo-arith", cwd=base).stdout
    assert "the chosen more likely in" in out
    proc = run("rl.py", "--init_from=out-rl-base", "--task=arithmetic", "--out_dir=out-rl-q", cwd=base, ok=False)
    assert "does not encode" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("body,word", [("    raise KeyError('answer')\n", "raised KeyError"),
                                       ("    return 'good'\n", "not a number")])
def test_a_reward_that_raises_or_is_not_a_number_is_one_line(base, body, word):
    (base / "bad_reward.py").write_text("def reward(prompt, completion, **fields):\n" + body)
    proc = run("rl.py", *ARGS, "--reward=bad_reward.py", "--max_iters=1", "--out_dir=out-rl-bad", cwd=base, ok=False)
    assert word in proc.stderr and "Write about" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1


def test_gsm8k_offline_with_nothing_cached_is_one_line(base, tmp_path):
    pytest.importorskip("datasets")
    proc = run("rl.py", "--init_from=out-rl-base", "--task=gsm8k", "--out_dir=out-rl-gsm", cwd=base, ok=False,
               env={"HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "empty"),
                    "HF_DATASETS_CACHE": str(tmp_path / "empty")})
    assert "GSM8K" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1


def test_the_built_in_sums_hold_out_what_sft_dpo_and_rl_train_on():
    from posttrain import arithmetic_pairs
    from rl import last_number_is_answer
    from sft import arithmetic, read_conversations
    held = {r["messages"][0]["content"] for r in arithmetic(300, 0, held_out=True)}
    trained = {c[0]["content"] for c in read_conversations("arithmetic")[2]} | \
        {r["messages"][0]["content"] for r in arithmetic(2000, 7)} | \
        {p["prompt"][0]["content"] for p in arithmetic_pairs(1000, 7)}
    assert len(held) > 250 and len(trained) > 4000 and not held & trained
    for pair in arithmetic_pairs(50, 3):
        a, b = map(int, pair["prompt"][0]["content"][8:-1].split(" + "))
        assert pair["chosen"] == f"{a} + {b} = {a + b}" and pair["rejected"] != pair["chosen"]
        assert pair["rejected"].startswith(f"{a} + {b} = ")
    assert last_number_is_answer("", "12 + 34 = 46", "46") == 1.0
    assert last_number_is_answer("", "12 + 34 = 45", "46") == 0.0
