"""Supervised fine-tuning on conversations: the chat template and loss mask written by the prepare scripts, windows
at conversation starts with the masked-out targets ignored, a tiny model that learns a task and answers it in
chat.py, exact resume, and one clear line for bad JSON Lines."""
import json

import numpy as np
import pytest
import torch

from chat import Chat
from conftest import TINY, run
from model import GPT, GPTConfig
from tokenizer import load_tokenizer
from training import draw_windows

PAIRS = {"cat": "meow", "dog": "woof", "cow": "moo", "owl": "hoot", "bee": "buzz", "duck": "quack"}


def conversations(copies=8):
    """The assistant answers an animal with its sound, under a system prompt."""
    return [{"messages": [{"role": "system", "content": "Sounds."}, {"role": "user", "content": animal},
                          {"role": "assistant", "content": sound}]}
            for _ in range(copies) for animal, sound in PAIRS.items()]


@pytest.fixture(scope="module")
def chat_data(tmp_path_factory):
    d = tmp_path_factory.mktemp("sft")
    (d / "sounds.jsonl").write_text("\n".join(json.dumps(c) for c in conversations()) + "\n", encoding="utf-8")
    run("prepare_char.py", "--input=sounds.jsonl", "--split=random", cwd=d)
    run("prepare_bpe.py", "--input=sounds.jsonl", "--vocab_size=300", "--split=random", cwd=d)
    return d


def load(folder, split="train"):
    meta = json.loads((folder / "meta.json").read_text())
    data = np.fromfile(folder / f"{split}.bin", dtype=meta["dtype"]).astype(np.int64)
    mask = np.fromfile(folder / f"{split}_mask.bin", dtype=np.uint8)
    starts = np.fromfile(folder / f"{split}_starts.bin", dtype=np.int64)
    tok = load_tokenizer(meta, folder)
    tok.meta = meta
    return meta, data, mask, starts, tok


@pytest.mark.parametrize("kind", ["char", "bpe", "gpt2"])
def test_prepare_and_chat_render_a_conversation_alike_and_the_mask_covers_the_replies(chat_data, kind, monkeypatch):
    if kind == "gpt2":  # GPT-2's tokens, from a small stand-in encoding (no download)
        from test_prepare_bpe import small_tiktoken
        monkeypatch.setattr("tokenizer.gpt2_encoding", small_tiktoken)
        run("prepare_bpe.py", "--input=sounds.jsonl", "--tokenizer=gpt2", "--split=random", cwd=chat_data)
    meta, data, mask, starts, tok = load(chat_data / "data" / f"sounds_{kind}")
    assert len(data) == len(mask) == meta["train_tokens"] and starts[0] == 0 and list(starts) == sorted(starts)
    assert meta["chat_template"]["style"] == ("special tokens" if kind == "bpe" else "text")
    ends = list(starts[1:]) + [len(data)]
    model = GPT(GPTConfig(n_layer=1, n_head=1, n_embd=8, block_size=16, vocab_size=meta["vocab_size"]))
    for s, e in zip(starts, ends, strict=True):
        ids, keep = data[s:e].tolist(), mask[s:e]
        learned = [t for t, m in zip(ids, keep, strict=True) if m]  # the reply and its end token, only
        assert learned[-1] == meta["chat_template"]["end_id"] and tok.decode(learned[:-1]) in PAIRS.values()
        animal = next(a for a, sound in PAIRS.items() if tok.decode(learned[:-1]) == sound)
        chat = Chat(model, tok, dict(system_prompt="Sounds.", user_prefix="", assistant_prefix="", seed=0), print)
        chat.turns = [(animal, PAIRS[animal])]
        assert chat.transcript() == ids  # chat.py renders it token for token as prepared
    if kind == "bpe":  # special tokens that text cannot produce: "<|user|>" typed by a user stays text
        assert meta["chat_template"]["markers"]["user"] == [tok.tok.token_to_id("<|user|>")]
        assert tok.tok.token_to_id("<|user|>") not in tok.encode("<|user|> hi")


def test_windows_start_at_conversations_and_the_loss_counts_only_the_replies(chat_data):
    meta, data, mask, starts, _ = load(chat_data / "data" / "sounds_char")
    block = 64  # a conversation is ~45 characters: windows hold a reply and the next conversation's start
    x, y = draw_windows(data, block, 16, torch.Generator().manual_seed(0), mask, starts)
    for row_x, row_y in zip(x.tolist(), y.tolist(), strict=True):
        # a conversation's start
        s = next(s for s in starts if data[s:s + block].tolist() == row_x[:len(data[s:s + block])])
        for j, target in enumerate(row_y):
            inside = s + j + 1 < len(data)
            assert target == (data[s + j + 1] if inside and mask[s + j + 1] else -1)  # -1: user, system, padding
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=16, block_size=block, vocab_size=meta["vocab_size"]))
    logits, loss = model(x, y)
    nats = torch.nn.functional.cross_entropy(logits.view(-1, logits.size(-1)), y.view(-1), reduction="none",
                                             ignore_index=-1)
    assert torch.allclose(loss, nats[y.view(-1) >= 0].mean())
    other = x.clone()
    other[y == -1] = (other[y == -1] + 1) % meta["vocab_size"]  # different tokens where only masked targets were
    assert torch.equal(draw_windows(data, block, 16, torch.Generator().manual_seed(0), mask, starts)[1], y)
    assert model(x, torch.full_like(y, -1))[1].item() == 0.0  # a window with nothing to learn adds nothing, not nan


def test_a_tiny_model_learns_the_replies_and_chat_answers_them(chat_data):
    args = ["--dataset=sounds_char", "--block_size=64", "--eval_interval=300", "--learning_rate=1e-2",
            *[a for a in TINY if not a.startswith(("--block_size", "--learning_rate"))]]
    run("train.py", "--out_dir=out-sft", "--max_iters=300", *args, cwd=chat_data)
    ckpt = torch.load(chat_data / "out-sft" / "ckpt.pt", weights_only=True)
    assert ckpt["meta"]["chat_template"]["end"] == "\u2404"  # the template travels with the checkpoint
    asked = list(PAIRS)
    out = run("chat.py", "--out_dir=out-sft", "--temperature=0", "--system_prompt=Sounds.", "--max_new_tokens=8",
              cwd=chat_data,
              input="\n".join(asked) + "\n/history\n").stdout
    replies = [line for line in out.split("System: ")[0].splitlines() if not line.startswith("(note")]
    assert replies == [PAIRS[a] for a in asked], out  # each answered, each reply ended at the end token
    assert f"User: {asked[-1]}\u2404Assistant: {PAIRS[asked[-1]]}\u2404" in out  # /history: the rendered template
    # resume with masks is exact: 6 steps straight == 3, then resumed to 6
    args[args.index("--eval_interval=300")] = "--eval_interval=3"
    run("train.py", "--out_dir=out-r1", "--max_iters=6", "--lr_decay_iters=6", *args, cwd=chat_data)
    run("train.py", "--out_dir=out-r2", "--max_iters=3", "--lr_decay_iters=6", *args, cwd=chat_data)
    run("train.py", "--out_dir=out-r2", "--max_iters=6", "--lr_decay_iters=6", "--init_from=resume", *args,
        cwd=chat_data)
    a, b = (torch.load(chat_data / d / "ckpt.pt", weights_only=True)["model"] for d in ("out-r1", "out-r2"))
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("line,why", [
    ("{not json", "is not JSON"),
    ('{"messages": [{"role": "user", "content": "hi"}]}', "no assistant message"),
    ('{"messages": [{"role": "robot", "content": "hi"}]}', "role (system, user or assistant)"),
    ('{"text": "hi"}', '"messages"'),
])
def test_bad_conversations_are_one_line_naming_the_file_and_line(tmp_path, line, why):
    good = json.dumps(conversations(1)[0])
    (tmp_path / "bad.jsonl").write_text(f"{good}\n{line}\n", encoding="utf-8")
    for script in ("prepare_char.py", "prepare_bpe.py"):
        proc = run(script, "--input=bad.jsonl", cwd=tmp_path, ok=False)
        assert why in proc.stderr and "bad.jsonl:2" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
        assert not (tmp_path / "data").exists() or not any((tmp_path / "data").iterdir())


@pytest.mark.parametrize("kind", ["char", "bpe"])
def test_a_base_model_with_an_older_vocabulary_is_fine_tuned_with_grown_embeddings(tmp_path, kind):
    """A base model whose vocabulary lacks the template's tokens (a BPE from before the chat tokens, characters
    without the end mark): the chat data keeps the base's ids and adds the new tokens after them, and the warm start
    keeps every learned embedding row, the new rows starting at their mean."""
    (tmp_path / "base.txt").write_text("the cat says meow and the dog says woof.\n" * 100, encoding="utf-8")
    (tmp_path / "c.jsonl").write_text("\n".join(json.dumps(c) for c in conversations(2)), encoding="utf-8")
    if kind == "bpe":
        from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
        old = Tokenizer(models.BPE())
        old.pre_tokenizer, old.decoder = pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel()
        old.train_from_iterator(["the cat says meow"] * 5, trainers.BpeTrainer(
            vocab_size=270, special_tokens=["<|bos|>", "<|eos|>"],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
        old.save(str(tmp_path / "old.json"))  # an older BPE: no <|user|> etc.
        run("prepare_bpe.py", "--input=base.txt", "--tokenizer=old.json", cwd=tmp_path)
        out = run("prepare_bpe.py", "--input=c.jsonl", "--tokenizer=old.json", cwd=tmp_path).stdout
        assert "added <|system|>, <|user|>, <|assistant|>, <|end|>" in out
    else:
        run("prepare_char.py", "--input=base.txt", cwd=tmp_path)
        run("prepare_char.py", "--input=c.jsonl", "--vocab_from=data/base_char", cwd=tmp_path)
    base, chat = (json.loads((tmp_path / "data" / f"{n}_{kind}" / "meta.json").read_text()) for n in ("base", "c"))
    assert chat["chat_template"]["end_id"] >= base["vocab_size"]  # new tokens come after the base's
    args = ["--block_size=64", *[a for a in TINY if not a.startswith(("--block_size", "--learning_rate", "--min_lr"))]]
    run("train.py", f"--dataset=base_{kind}", "--out_dir=out-base", "--max_iters=2", "--eval_interval=2", *args,
        cwd=tmp_path)
    frozen = ["--learning_rate=0", "--min_lr=0", "--weight_decay=0"]  # one step that changes nothing: compare the rows
    run("train.py", f"--dataset=c_{kind}", "--init_from=out-base", "--out_dir=out-sft", "--max_iters=1",
        "--eval_interval=1",
        *args, *frozen, cwd=tmp_path)
    old_rows, new_rows = (torch.load(tmp_path / d / "ckpt.pt", weights_only=True)["model"]["transformer.wte.weight"]
                          for d in ("out-base", "out-sft"))
    assert len(new_rows) == chat["vocab_size"] > len(old_rows) == base["vocab_size"]
    assert torch.equal(new_rows[:len(old_rows)], old_rows)
    assert torch.allclose(new_rows[len(old_rows):], old_rows.mean(0).expand(len(new_rows) - len(old_rows), -1))


@pytest.mark.parametrize("kind", ["char", "bpe"])
def test_an_exported_chat_model_renders_conversations_as_chat_does_in_transformers(chat_data, kind):
    """convert.py writes the template as tokenizer_config.json's chat_template: transformers' apply_chat_template
    gives the token ids chat.py feeds the model."""
    transformers = pytest.importorskip("transformers")
    run("train.py", f"--dataset=sounds_{kind}", f"--out_dir=out-export-{kind}", "--max_iters=1", "--eval_interval=1",
        "--block_size=64", *[a for a in TINY if not a.startswith("--block_size")], cwd=chat_data)
    run("convert.py", f"--out_dir=out-export-{kind}", "--to=hf", f"--dest=hf-{kind}", cwd=chat_data)
    hf = transformers.AutoTokenizer.from_pretrained(str(chat_data / f"hf-{kind}"))
    messages = [dict(role="system", content="Sounds."), dict(role="user", content="cat"),
                dict(role="assistant", content="meow"), dict(role="user", content="dog")]
    ids = hf.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False)
    meta, *_, tok = load(chat_data / "data" / f"sounds_{kind}")
    model = GPT(GPTConfig(n_layer=1, n_head=1, n_embd=8, block_size=16, vocab_size=meta["vocab_size"]))
    chat = Chat(model, tok, dict(system_prompt="Sounds.", user_prefix="", assistant_prefix="", seed=0), print)
    chat.turns = [("cat", "meow")]
    system, turns = chat.messages("dog")
    assert list(ids) == chat.template.encode(system + turns, add_generation_prompt=True)
    stops = json.loads((chat_data / f"hf-{kind}" / "generation_config.json").read_text())["eos_token_id"]
    assert meta["chat_template"]["end_id"] in (stops if isinstance(stops, list) else [stops])  # generate() ends turns
