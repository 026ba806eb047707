"""recommend.py: the rules pick larger shapes as the budget and the data grow, stop where more passes would
overfit, and the command it prints runs."""

import json

import recommend
from conftest import run
from recommend import LADDER, MAX_PASSES, SPEED_PASSES, TOKENS_PER_WEIGHT, block_weights, plan

SPEEDS = [40_000, 16_000, 5_600, 2_000, 500, 50]  # tokens/s per rung, like a 2-core CPU's


def test_the_largest_rung_that_pays_is_chosen():
    for budget in (10, 30, 120, 300, 1200, 4000, 100_000):
        for data in (100_000, 1_000_000, 10 ** 9):
            rung, seconds, why = plan(SPEEDS, data, budget, "quality")
            usable = [min(s * budget, MAX_PASSES * data) for s in SPEEDS]
            assert rung == 0 or usable[rung] >= TOKENS_PER_WEIGHT * block_weights(LADDER[rung])
            assert all(usable[i] < TOKENS_PER_WEIGHT * block_weights(LADDER[i]) for i in range(rung + 1, len(SPEEDS)))
            assert seconds <= budget and any(f"{LADDER[rung][0]} layer" in line for line in why)
    rungs = [plan(SPEEDS, 10 ** 9, b, "quality")[0] for b in (30, 300, 3000, 30_000, 300_000)]
    assert rungs == sorted(rungs) and rungs[0] < rungs[-1]  # more time, a larger model
    rungs = [plan(SPEEDS, data, 3000, "quality")[0] for data in (10 ** 5, 10 ** 6, 10 ** 9)]
    assert rungs == sorted(rungs) and rungs[0] < rungs[-1]  # more data, a larger model
    assert plan(SPEEDS[:2], 10 ** 9, 10 ** 7, "quality")[0] == 1  # never a rung it could not measure


def test_a_budget_past_the_useful_passes_stops_early():
    rung, seconds, why = plan(SPEEDS, 100_000, 600, "quality")
    assert seconds == MAX_PASSES * 100_000 / SPEEDS[rung] < 600 and any("stopped at" in line for line in why)
    assert plan(SPEEDS, 10 ** 9, 600, "quality")[1] == 600


def test_priority_speed_stops_the_smallest_shape_where_it_levels_off():
    rung, seconds, why = plan(SPEEDS, 1_000_000, 1200, "speed")
    assert rung == 0 and seconds == SPEED_PASSES * 1_000_000 / SPEEDS[0] < 1200
    assert plan(SPEEDS, 1_000_000, 20, "speed")[1] == 20  # never past the budget
    assert any("priority=speed" in line for line in why)


def test_recommend_prints_a_command_that_runs(workdir):
    proc = run("recommend.py", "--dataset=tiny_char", "--max_time=3", "--out_dir=out-rec", "--run=True",
               "--train_args=--compile=False --eval_iters=2 --log_interval=5", cwd=workdir)
    command = next(line for line in proc.stdout.splitlines() if line.startswith("python train.py"))
    assert "config/shakespeare_char_cpu.py" in command and "--ngram_emb" not in command
    assert "passes over" in proc.stdout and "tokens/s" in proc.stderr
    info = json.loads((workdir / "out-rec" / "run_meta.json").read_text())
    settings = dict(a[2:].split("=", 1) for a in command.split() if a.startswith("--"))
    assert 0 < float(settings["max_time"]) <= 3  # the budget, or less where 5 passes over the data end sooner
    for key in ("n_layer", "n_embd", "block_size", "batch_size", "max_time"):
        assert float(info["config"][key]) == float(settings[key]), key
    assert info["config"]["compile"] is False and (workdir / "out-rec" / "ckpt.pt").exists()
    assert recommend.LADDER[0][2] == info["config"]["n_embd"]  # 3 s buys the smallest rung


def test_the_command_drops_the_ngram_tables_for_token_vocabularies():
    char = recommend.command(1, 42.0, 3, "cpu", "out-x")
    tokens = recommend.command(1, 42.0, 0, "cpu", "out-x")
    assert "--ngram_emb=0" in tokens and not any(a.startswith("--ngram_emb") for a in char)
    assert char[:2] == ["train.py", "config/shakespeare_char_cpu.py"] and "--max_time=42" in char and "--n_embd=128" in char
