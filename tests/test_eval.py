"""eval.py: parity with lm-evaluation-harness's own Hugging Face model on local tasks (a GPT-2-layout, a Llama-layout
and a character model), bits per byte on a text equal to train.py's, the harness during training, and bad input."""

import csv
import json

import numpy as np
import pytest

from conftest import TINY, corpus_text, run

lm_eval = pytest.importorskip("lm_eval")
transformers = pytest.importorskip("transformers")
ARGS = [a for a in TINY if not a.startswith("--block_size")] + ["--block_size=64", "--max_iters=30",
                                                                  "--eval_interval=30"]


@pytest.fixture(scope="module")
def tasks(tmp_path_factory):
    """A folder with two local tasks over JSONL data made here: multiple choice (which continuation of a docs line
    is the real one) and a perplexity task on docs paragraphs."""
    d = tmp_path_factory.mktemp("tasks")
    lines = [line.strip() for line in corpus_text()[5000:20000].splitlines() if len(line.strip()) > 40][:12]
    items = [dict(context=line[:25], choices=[line[25:40], lines[(i + 3) % len(lines)][25:40],
                                               lines[(i + 7) % len(lines)][25:40]], answer=0)
             for i, line in enumerate(lines)]
    (d / "mc.jsonl").write_text("\n".join(json.dumps(item) for item in items))
    texts = [corpus_text()[i:i + 300] for i in range(0, 3000, 500)]
    (d / "ppl.jsonl").write_text("\n".join(json.dumps(dict(text=t)) for t in texts))
    (d / "local_mc.yaml").write_text(f"""task: local_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {d / 'mc.jsonl'}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{context}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{answer}}}}"
metric_list:
  - metric: acc
""")
    (d / "local_ppl.yaml").write_text(f"""task: local_ppl
dataset_path: json
dataset_kwargs:
  data_files:
    test: {d / 'ppl.jsonl'}
test_split: test
output_type: loglikelihood_rolling
doc_to_text: ""
doc_to_target: "{{{{text}}}}"
metric_list:
  - metric: word_perplexity
  - metric: bits_per_byte
""")
    return d


@pytest.fixture(scope="module")
def models(workdir):
    """Three small trained models and their Hugging Face exports: GPT-2 and Llama layouts on BPE tokens, and GPT-2's
    layout on characters."""
    if not (workdir / "data" / "tiny_bpe").exists():
        run("prepare_bpe.py", "--input=tiny.txt", "--vocab_size=300", cwd=workdir)
    for name, extra in (("gpt2", ["--dataset=tiny_bpe"]), ("llama", ["--dataset=tiny_bpe", "--model_type=gpt_plus"]),
                        ("char", ["--dataset=tiny_char"])):
        run("train.py", f"--out_dir=out-eval-{name}", *ARGS, *extra, cwd=workdir)
        run("convert.py", f"--out_dir=out-eval-{name}", "--to=hf", f"--dest=hf-eval-{name}", "--overwrite=True",
            cwd=workdir)
    return workdir


def samples(result, task):
    return {s["doc_id"]: [r[0] for r in s["resps"]] for s in result["samples"][task]}


@pytest.mark.parametrize("name", ["gpt2", "llama", "char"])
def test_the_harness_scores_us_as_it_scores_the_exported_model(models, tasks, name):
    """Our adapter and the harness's own `hf` model on the export: the same accuracy and per-item log-likelihoods
    (to 1e-4 in float32), on multiple choice and on rolling perplexity."""
    from conftest import load
    from harness import YoctoLM, prefix_id, run_tasks, task_manager
    model, tokenizer = load(str(models / f"out-eval-{name}"))
    ours = run_tasks(YoctoLM(model, tokenizer, batch_size=4), ["local_mc", "local_ppl"], include_path=str(tasks),
                     samples=True)
    manager = task_manager(["local_mc"], str(tasks))  # the same task index (building one takes seconds)
    theirs = lm_eval.simple_evaluate(model="hf", tasks=["local_mc", "local_ppl"], task_manager=manager,
                                     model_args=f"pretrained={models / f'hf-eval-{name}'},dtype=float32,"
                                                f"prefix_token_id={prefix_id(tokenizer)}",
                                     batch_size=2, device="cpu", log_samples=True, bootstrap_iters=0)
    assert ours["results"]["local_mc"]["acc,none"] == theirs["results"]["local_mc"]["acc,none"]
    for task in ("local_mc", "local_ppl"):
        a, b = samples(ours, task), samples(theirs, task)
        assert a.keys() == b.keys()
        for doc in a:
            for x, y in zip(a[doc], b[doc], strict=True):
                x, y = (x[0], y[0]) if isinstance(x, (list, tuple)) else (x, y)
                assert abs(x - y) <= 1e-4 * max(1.0, abs(y)), (task, doc, x, y)
    bpb = ours["results"]["local_ppl"]["bits_per_byte,none"]
    assert abs(bpb - theirs["results"]["local_ppl"]["bits_per_byte,none"]) <= 1e-5


def test_eval_py_prints_the_table_and_writes_the_json(models, tasks, tmp_path):
    out = run("eval.py", "--out_dir=out-eval-char", "--tasks=local_mc", f"--include_path={tasks}", "--limit=5",
              f"--output={tmp_path / 'r.json'}", cwd=models).stdout
    assert "local_mc" in out and "acc" in out and "|" in out
    result = json.loads((tmp_path / "r.json").read_text())
    assert len(result["samples"]["local_mc"]) == 5 and 0 <= result["results"]["local_mc"]["acc,none"] <= 1


def test_text_bits_per_byte_equal_train_pys_validation_on_the_same_window(workdir, tmp_path):
    """A dataset whose validation split is exactly one window: eval.py --text on that text gives the val loss and
    bits per byte train.py logged for it."""
    run("prepare_char.py", "--input=tiny.txt", "--out_dir=data/one_window", cwd=workdir)
    folder = workdir / "data" / "one_window"
    meta = json.loads((folder / "meta.json").read_text())
    text = corpus_text()[30000:30065]  # 65 characters: block_size 64 + 1
    np.array([meta["vocab"].index(c) for c in text], dtype=np.uint16).tofile(folder / "val.bin")
    (tmp_path / "val.txt").write_text(text)
    run("train.py", "--dataset=one_window", "--out_dir=out-one-window", *ARGS, cwd=workdir)
    with open(workdir / "out-one-window" / "metrics.csv") as f:
        last = [r for r in csv.DictReader(f) if r["val_bpb"]][-1]
    out = run("eval.py", "--out_dir=out-one-window", f"--text={tmp_path / 'val.txt'}", cwd=workdir).stdout
    loss, bpb = (float(out.split(word)[0].split()[-1]) for word in (" per token", " bits per byte"))
    assert "64 tokens scored" in out
    assert abs(loss - float(last["val_loss"])) < 1e-4 and abs(bpb - float(last["val_bpb"])) < 1e-4


def test_the_harness_during_training_logs_each_task(workdir, tasks):
    proc = run("train.py", "--dataset=tiny_char", "--out_dir=out-eval-tasks", *ARGS, "--eval_tasks=local_mc",
               f"--eval_tasks_path={tasks}", "--eval_tasks_limit=4", "--max_iters=2", "--eval_interval=2",
               cwd=workdir)
    assert proc.stdout.count(", local_mc ") == 2  # steps 0 and 2
    with open(workdir / "out-eval-tasks" / "metrics.csv") as f:
        scores = [float(r["local_mc"]) for r in csv.DictReader(f) if r["local_mc"]]
    assert len(scores) == 2 and all(s in (0, 0.25, 0.5, 0.75, 1) for s in scores)


@pytest.mark.parametrize("args,words", [(["--tasks=no_such_task_here"], "unknown task"),
                                        (["--text=missing.txt"], "not found"),
                                        (["--text=empty.txt"], "empty"),
                                        (["--text=binary.txt"], "binary"),
                                        (["--tasks=local_mc", "--limit=0"], "--limit=0"),
                                        (["--text=empty.txt", "--tasks=x"], "one of them"),
                                        (["--out_dir=no-checkpoint", "--text=ok.txt"], "not found")])
def test_bad_input_is_one_line(models, tasks, args, words):
    (models / "empty.txt").write_text(" \n")
    (models / "binary.txt").write_bytes(b"\x00\x01\x02" * 10)
    (models / "ok.txt").write_text("The with statement is used to wrap a block.")
    (models / "no-checkpoint").mkdir(exist_ok=True)
    proc = run("eval.py", *(["--out_dir=out-eval-char"] if not any("out_dir" in a for a in args) else []), *args,
               f"--include_path={tasks}", cwd=models, ok=False)
    assert len(proc.stderr.strip().splitlines()) == 1 and words in proc.stderr, proc.stderr
