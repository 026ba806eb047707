"""Real small models from the Hugging Face hub, offline: hf:ORG/NAME through a pre-filled cache (HF_HUB_OFFLINE=1),
their own chat templates rendered as transformers renders them, fine-tuning on conversations in that template, and
the export that transformers' generate() stops at the end of a turn. The "hub" holds tiny random models built here."""

import json
import types

import numpy as np
import pytest
import torch

from conftest import TINY, corpus_text, run

transformers = pytest.importorskip("transformers")
pytest.importorskip("safetensors")
pytest.importorskip("jinja2")

CHATML = ("{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
          "{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}{% endif %}"
          "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}{% endfor %}"
          "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")  # SmolLM2-Instruct's
LLAMA3 = ("{{ bos_token }}{% for message in messages %}{{ '<|start_header_id|>' + message['role'] + "
          "'<|end_header_id|>\n\n' + message['content'] | trim + '<|eot_id|>' }}{% endfor %}"
          "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}")
REPOS = {  # repo: (architecture, template, special tokens, bos, eos)
    "test-org/tiny-chat": ("llama", CHATML, ["<|endoftext|>", "<|im_start|>", "<|im_end|>"], "<|im_start|>",
                           "<|im_end|>"),
    "test-org/tiny-qwen3": ("qwen3", LLAMA3, ["<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>",
                                              "<|eot_id|>"], "<|begin_of_text|>", "<|eot_id|>"),
}
PAIRS = {"cat": "meow", "dog": "woof", "cow": "moo", "owl": "hoot", "bee": "buzz", "duck": "quack"}


def tokenizer_files(folder, specials, template, bos, eos):
    """A small byte-level BPE with the chat's special tokens, and a tokenizer_config.json naming them."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([corpus_text()[:20000], " ".join(PAIRS) + " " + " ".join(PAIRS.values())], trainer)
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps(dict(
        tokenizer_class="PreTrainedTokenizerFast", bos_token=bos, eos_token=eos, chat_template=template)))
    return tok.get_vocab_size()


def tiny_model(arch, vocab_size):
    torch.manual_seed(0)
    shape = dict(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    if arch == "llama":
        return transformers.LlamaForCausalLM(transformers.LlamaConfig(**shape, tie_word_embeddings=True))
    model = transformers.Qwen3ForCausalLM(transformers.Qwen3Config(**shape, head_dim=16, tie_word_embeddings=False))
    with torch.no_grad():  # learned q/k norm scales, as a trained Qwen3 has
        for name, p in model.named_parameters():
            if name.endswith(("q_norm.weight", "k_norm.weight")):
                p.uniform_(0.5, 1.5)
    return model


def cache_repo(home, repo, build):
    """Put a snapshot of `repo` in the hub cache under HF_HOME=home, as snapshot_download leaves it."""
    root = home / "hub" / f"models--{repo.replace('/', '--')}"
    snapshot = root / "snapshots" / ("1" * 40)
    snapshot.mkdir(parents=True)
    build(snapshot)
    (root / "refs").mkdir()
    (root / "refs" / "main").write_text("1" * 40)
    return snapshot


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    """HF_HOME with the tiny chat models and one of an architecture we do not represent; its env for run()."""
    home = tmp_path_factory.mktemp("hf-home")
    folders = {}
    for repo, (arch, template, specials, bos, eos) in REPOS.items():
        def build(folder, arch=arch, template=template, specials=specials, bos=bos, eos=eos):
            size = tokenizer_files(folder, specials, template, bos, eos)
            tiny_model(arch, size).save_pretrained(folder)
            (folder / "generation_config.json").write_text(json.dumps(dict(eos_token_id=specials.index(eos))))
        folders[repo] = cache_repo(home, repo, build)

    def biased(folder):
        config = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                          num_attention_heads=4, attention_bias=True)
        transformers.LlamaForCausalLM(config).save_pretrained(folder)
    cache_repo(home, "test-org/biased", biased)
    return dict(env={"HF_HOME": str(home), "HF_HUB_OFFLINE": "1"}, folders=folders)


def test_hub_ids_load_from_the_cache_with_their_logits(hub, tmp_path):
    """hf:ORG/NAME (and @REVISION) imports from the cache; a Qwen3 with its own head_dim and learned q/k norm
    scales gives transformers' logits."""
    run("convert.py", "--src=hf:test-org/tiny-qwen3@main", f"--out_dir={tmp_path / 'qwen'}", cwd=tmp_path,
        env=hub["env"])
    from checkpoint import build_model, load_checkpoint, load_source
    saved = load_checkpoint(str(tmp_path / "qwen" / "ckpt.pt"))
    assert saved["model_config"]["head_dim"] == 16 and saved["model_config"]["qk_norm_scale"]
    assert saved["meta"]["chat_template"] == LLAMA3 and saved["meta"]["stop_ids"] == [3]
    model = build_model(load_source(str(tmp_path / "qwen")), "cpu").eval()
    theirs = transformers.AutoModelForCausalLM.from_pretrained(str(hub["folders"]["test-org/tiny-qwen3"])).eval()
    x = torch.randint(0, 200, (2, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert (model(x, x)[0] - theirs(x).logits).abs().max().item() <= 1e-4


@pytest.mark.parametrize("spec,words", [("hf:test-org/not-cached", ["go online once"]),
                                        ("hf:test-org/biased", ["attention_bias"]),
                                        ("hf:not a/hub id", ["neither a folder"])])
def test_what_cannot_be_read_from_the_hub_is_one_line(hub, tmp_path, spec, words):
    proc = run("convert.py", f"--src={spec}", f"--out_dir={tmp_path / 'x'}", cwd=tmp_path, env=hub["env"], ok=False)
    assert len(proc.stderr.strip().splitlines()) == 1 and all(w in proc.stderr for w in words), proc.stderr
    assert not (tmp_path / "x").exists()


def test_a_gated_repo_says_how_to_get_access(tmp_path, monkeypatch):
    import huggingface_hub
    from huggingface_hub.errors import GatedRepoError

    def gated(*args, **kwargs):  # what the hub answers for a gated repo without access
        response = types.SimpleNamespace(status_code=403, headers={}, request=None)
        raise GatedRepoError("403 Client Error: access to model test-org/gated is restricted", response=response)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", gated)
    proc = run("sample.py", "--init_from=hf:test-org/gated", cwd=tmp_path, ok=False)
    assert "gated" in proc.stderr and "log in" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("repo", list(REPOS))
def test_the_models_own_template_renders_as_apply_chat_template(hub, repo):
    """System prompts, defaults, several turns, with and without the generation prompt: our ids are
    transformers' apply_chat_template ids, token for token."""
    from chat_templates import JinjaTemplate, template_for
    from hf_tokenizer import meta_from_hf
    from tokenizer import load_tokenizer
    folder = hub["folders"][repo]
    meta = meta_from_hf(str(folder), REPOS[repo][0], 0)
    template = template_for(meta, load_tokenizer(meta))
    assert isinstance(template, JinjaTemplate) and template.stop_ids == [REPOS[repo][2].index(REPOS[repo][4])]
    theirs = transformers.AutoTokenizer.from_pretrained(str(folder))
    turns = [dict(role="user", content="What does a cat say?"), dict(role="assistant", content=" meow "),
             dict(role="user", content="And  a dog?\n")]
    for messages in (turns[:1], [dict(role="system", content="Sounds only.")] + turns, turns):
        for prompt in (True, False):
            expected = theirs.apply_chat_template(messages, add_generation_prompt=prompt, tokenize=True,
                                                  return_dict=False)
            assert template.encode(messages, add_generation_prompt=prompt) == list(expected)


def test_fine_tune_an_imported_model_in_its_template_chat_and_export(hub, tmp_path):
    """prepare_bpe.py --tokenizer=hf:... masks the replies as the model's template renders them; a warm start from
    hf:... learns them; chat.py answers in the template and stops at <|im_end|>; the export's generate() gives
    our greedy tokens and stops there too."""
    env = hub["env"]
    lines = [{"messages": [{"role": "user", "content": a}, {"role": "assistant", "content": s}]}
             for _ in range(8) for a, s in PAIRS.items()]
    (tmp_path / "sounds.jsonl").write_text("\n".join(json.dumps(line) for line in lines))
    run("prepare_bpe.py", "--input=sounds.jsonl", "--tokenizer=hf:test-org/tiny-chat", "--split=random",
        cwd=tmp_path, env=env)
    data = tmp_path / "data" / "sounds_bpe"
    meta = json.loads((data / "meta.json").read_text())
    assert meta["chat_template"] == CHATML and meta["stop_ids"] == [2]
    from tokenizer import load_tokenizer
    tok = load_tokenizer(meta, data)
    ids, mask = np.fromfile(data / "train.bin", dtype=meta["dtype"]), np.fromfile(data / "train_mask.bin", np.uint8)
    learned = tok.tok.decode(ids[mask == 1][:40].tolist(), skip_special_tokens=False)
    assert "<|im_end|>\n" in learned and "<|im_start|>" not in learned and "assistant" not in learned

    args = [a for a in TINY if a.split("=")[0] not in ("--n_layer", "--n_head", "--n_embd", "--block_size",
                                                         "--learning_rate")]
    run("train.py", "--init_from=hf:test-org/tiny-chat", "--dataset=sounds_bpe", "--out_dir=out-chat",
        "--block_size=64", "--max_iters=300", "--eval_interval=300", "--learning_rate=1e-2", "--weight_decay=0",
        *args, cwd=tmp_path, env=env)
    # (the run keeps the source's 128-token context; chat.py at the 64 it was trained on, as one-turn chats fit)
    out = run("chat.py", "--out_dir=out-chat", "--temperature=0", "--max_new_tokens=12", "--block_size=64",
              cwd=tmp_path, input="\n".join(PAIRS) + "\n").stdout
    replies = [line for line in out.splitlines() if not line.startswith("(note")]
    assert replies == list(PAIRS.values()), out  # each reply ended at <|im_end|>, none ran on

    run("convert.py", "--out_dir=out-chat", "--to=hf", "--dest=hf-chat", cwd=tmp_path)
    exported = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf-chat")).eval()
    theirs = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "hf-chat"))
    prompt = theirs.apply_chat_template([dict(role="user", content="owl")], add_generation_prompt=True,
                                        return_tensors="pt", return_dict=True)["input_ids"]
    generated = exported.generate(prompt, max_new_tokens=12, do_sample=False)[0, prompt.shape[1]:].tolist()
    assert theirs.decode(generated) == "hoot<|im_end|>"  # generate() stopped at the end of the turn
