"""convert.py and warm starts: export to Hugging Face with logit parity (transformers loads it), import of
Hugging Face GPT-2/Llama folders, OpenAI's GPT-2 through the hub cache, nanoGPT checkpoints and meta.pkl."""

import json
import os
import pickle

import nanogpt_ref
import pytest
import torch

from conftest import TINY, run
from generate import generate

transformers = pytest.importorskip("transformers")
pytest.importorskip("safetensors")

ARGS = [a for a in TINY if not a.startswith("--block_size")] + ["--block_size=64", "--dataset=tiny_char"]
VARIANTS = {  # name: (train.py flags, the transformers class it must load as)
    "gpt": ([], "GPT2LMHeadModel"),
    "gpt_tanh_nobias_untied": (["--mlp=gelu_tanh", "--bias=False", "--tie_weights=False", "--norm_affine=False"],
                               "GPT2LMHeadModel"),
    "gpt_plus_gqa_tied": (["--model_type=gpt_plus", "--n_head=4", "--n_kv_head=2"], "LlamaForCausalLM"),
    "gpt_plus_gqa_untied": (["--model_type=gpt_plus", "--n_head=4", "--n_kv_head=2", "--tie_weights=False",
                             "--rope_theta=500"], "LlamaForCausalLM"),
    "gpt_plus_qk_norm": (["--model_type=gpt_plus", "--qk_norm=True"], "Qwen3ForCausalLM"),
}


def ours(out_dir):
    from conftest import load
    return load(str(out_dir))


def hf_model(folder):
    return transformers.AutoModelForCausalLM.from_pretrained(str(folder)).eval()


@pytest.mark.parametrize("variant", VARIANTS)
def test_export_loads_in_transformers_with_the_same_logits_and_greedy_text(workdir, variant):
    flags, cls = VARIANTS[variant]
    out, dest = f"out-x-{variant}", workdir / f"hf-{variant}"
    run("train.py", *ARGS, *flags, "--max_iters=6", "--eval_interval=6", f"--out_dir={out}", cwd=workdir)
    run("convert.py", f"--out_dir={out}", "--to=hf", f"--dest={dest}", cwd=workdir)
    model, tok = ours(workdir / out)
    hf = hf_model(dest)
    assert type(hf).__name__ == cls
    x = torch.randint(0, model.config.vocab_size, (2, 64), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        mine, _ = model(x, x)
        theirs = hf(x).logits
    assert (mine - theirs).abs().max().item() <= 1e-4
    prompt = torch.tensor([tok.encode("The ")])
    greedy = generate(model, prompt, 30, temperature=0)
    hf_greedy = hf.generate(prompt, max_new_tokens=30, do_sample=False, pad_token_id=0)
    assert greedy == hf_greedy[:, prompt.size(1):].tolist()
    text = "Return the value of x, or None.\n"  # the character tokenizer travels too
    assert transformers.AutoTokenizer.from_pretrained(str(dest)).encode(text) == tok.encode(text)
    assert "not empty" in run("convert.py", f"--out_dir={out}", "--to=hf", f"--dest={dest}", cwd=workdir,
                              ok=False).stderr


def save_run(folder, cfg, meta=None):
    """A yoctoGPT out_dir holding a random model of cfg (for export refusals)."""
    from checkpoint import save_checkpoint
    from model import GPT
    os.makedirs(folder, exist_ok=True)
    save_checkpoint(dict(model=GPT(cfg).state_dict(), model_config=vars(cfg), meta=meta), str(folder / "ckpt.pt"))


@pytest.mark.parametrize("fields,word", [(dict(model_type="gpt_fast"), "mlp='relu2'"), (dict(ngram_emb=2), "ngram_emb"),
                                         (dict(logit_softcap=15.0), "logit_softcap"), (dict(n_kv_head=1), "n_kv_head")])
def test_export_refuses_what_hugging_face_cannot_hold(tmp_path, fields, word):
    from model import config_from_preset
    cfg = config_from_preset(fields.pop("model_type", "gpt"), vocab_size=20, block_size=16, n_layer=1, n_head=2,
                             n_embd=16, **fields)
    save_run(tmp_path / "run", cfg)
    proc = run("convert.py", "--out_dir=run", "--to=hf", "--dest=hf", cwd=tmp_path, ok=False)
    assert word in proc.stderr and len(proc.stderr.strip().splitlines()) == 1 and not (tmp_path / "hf").exists()


def tiny_hf(kind, vocab_size):
    torch.manual_seed(0)
    if kind == "gpt2":
        return transformers.GPT2LMHeadModel(transformers.GPT2Config(vocab_size=vocab_size, n_positions=64, n_embd=32,
                                                                    n_layer=2, n_head=4)).eval()
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=vocab_size, hidden_size=32, intermediate_size=80, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, rope_theta=1000.0)).eval()


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_import_hugging_face_folder_same_logits_then_warm_start_and_resume(workdir, kind):
    hf = tiny_hf(kind, vocab_size=120)
    hf.save_pretrained(workdir / f"hf-src-{kind}")
    run("convert.py", f"--src=hf:hf-src-{kind}", f"--out_dir=out-imp-{kind}", cwd=workdir)
    from checkpoint import build_model, load_source
    model = build_model(load_source(str(workdir / f"out-imp-{kind}")), "cpu").eval()
    x = torch.randint(0, 120, (2, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert (model(x, x)[0] - hf(x).logits).abs().max().item() <= 1e-4
    # a warm start takes the folder's architecture and context with no model flags, then resumes like any run
    base = [a for a in TINY if a.split("=")[0] not in ("--n_layer", "--n_head", "--n_embd", "--block_size")]
    out = f"out-hfwarm-{kind}"
    proc = run("train.py", *base, "--dataset=tiny_char", f"--init_from=hf:hf-src-{kind}", "--max_iters=4",
               "--eval_interval=4", f"--out_dir={out}", cwd=workdir)
    assert "missing keys []" in proc.stdout
    saved = torch.load(workdir / out / "ckpt.pt", weights_only=True)
    assert saved["model_config"]["n_embd"] == 32 and saved["model_config"]["block_size"] == 64
    run("train.py", *base, "--dataset=tiny_char", "--init_from=resume", "--max_iters=8", f"--out_dir={out}",
        cwd=workdir)
    assert torch.load(workdir / out / "ckpt.pt", weights_only=True)["iter_num"] == 8
    proc = run("train.py", "--init_from=resume", f"--out_dir=out-imp-{kind}", cwd=workdir, ok=False)
    assert "no training state" in proc.stderr  # an imported folder is warm-started from, not resumed


def fake_hub_cache(home):
    """HF_HOME holding a tiny stand-in for openai-community/gpt2 (GPT-2's vocabulary, two small layers)."""
    snap = home / "hub" / "models--openai-community--gpt2" / "snapshots" / ("0" * 40)
    tiny_hf("gpt2", vocab_size=50257).save_pretrained(snap)
    (home / "hub" / "models--openai-community--gpt2" / "refs").mkdir()
    (home / "hub" / "models--openai-community--gpt2" / "refs" / "main").write_text("0" * 40)


def test_init_from_gpt2_uses_the_hub_cache_and_says_what_is_wrong_offline(workdir, tmp_path):
    offline = {"HF_HOME": str(tmp_path / "empty"), "HF_HUB_OFFLINE": "1"}
    proc = run("train.py", "--init_from=gpt2", "--dataset=tiny_char", "--out_dir=out-g", cwd=workdir, ok=False,
               env=offline)
    assert "go online once" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    fake_hub_cache(tmp_path / "home")
    cached = {"HF_HOME": str(tmp_path / "home"), "HF_HUB_OFFLINE": "1"}
    proc = run("train.py", "--init_from=gpt2", "--dataset=tiny_char", "--out_dir=out-g", cwd=workdir, ok=False,
               env=cached)
    assert "GPT-2's tokens" in proc.stderr and "--tokenizer=gpt2" in proc.stderr  # char data for GPT-2 weights
    run("convert.py", "--src=gpt2", "--out_dir=out-gpt2", cwd=tmp_path, env=cached)
    saved = torch.load(tmp_path / "out-gpt2" / "ckpt.pt", weights_only=True)
    assert saved["meta"]["tokenizer"] == "gpt2" and saved["model_config"]["mlp"] == "gelu_tanh"
    assert saved["model_config"]["vocab_size"] == 50257 and saved["model_config"]["block_size"] == 64


def nanogpt_run(folder, meta_pkl, vocab_size, dataset="nano"):
    """A nanoGPT out_dir made here from the reference implementation (tests/nanogpt_ref.py, no code of ours): its
    ckpt.pt layout (model_args, torch.compile's _orig_mod. prefix, the causal-mask buffers of its non-flash
    attention) and meta.pkl in data/<dataset>/. Returns (weights, model_args) for nanogpt_ref."""
    args = dict(n_layer=2, n_head=2, n_embd=32, block_size=32, bias=False, vocab_size=vocab_size, dropout=0.0)
    weights = nanogpt_ref.init_state(args, seed=3)
    state = {"_orig_mod." + k: v for k, v in weights.items()}
    for i in range(2):
        state[f"_orig_mod.transformer.h.{i}.attn.bias"] = torch.ones(32, 32).tril().view(1, 1, 32, 32)
    os.makedirs(folder / "out-nano", exist_ok=True)
    torch.save(dict(model=state, model_args=args, optimizer={}, iter_num=100, best_val_loss=torch.tensor(1.5),
                    config=dict(dataset=dataset, batch_size=12)), folder / "out-nano" / "ckpt.pt")
    os.makedirs(folder / "data" / dataset, exist_ok=True)
    with open(folder / "data" / dataset / "meta.pkl", "wb") as f:
        pickle.dump(meta_pkl, f)
    return weights, args


def test_nanogpt_checkpoint_samples_converts_and_warm_starts(workdir):
    meta = json.loads((workdir / "data" / "tiny_char" / "meta.json").read_text())
    chars = meta["vocab"]
    weights, args = nanogpt_run(workdir, dict(vocab_size=len(chars), itos=dict(enumerate(chars)),
                                              stoi={c: i for i, c in enumerate(chars)}), len(chars))
    proc = run("sample.py", "--out_dir=out-nano", "--prompt=The ", "--temperature=0", "--max_new_tokens=20",
               cwd=workdir)
    ids = nanogpt_ref.greedy(weights, args, [chars.index(c) for c in "The "], 20)  # nanoGPT's model's tokens
    assert proc.stdout == "The " + "".join(chars[i] for i in ids) + "\n"  # its weights and vocabulary, as saved
    run("chat.py", "--out_dir=out-nano", "--max_new_tokens=5", cwd=workdir, input="hello\n")
    run("convert.py", "--src=out-nano", "--out_dir=out-nano-conv", cwd=workdir)
    proc = run("sample.py", "--out_dir=out-nano-conv", "--prompt=The ", "--temperature=0", "--max_new_tokens=20",
               cwd=workdir)
    assert proc.stdout == "The " + "".join(chars[i] for i in ids) + "\n"
    base = [a for a in TINY if a.split("=")[0] not in ("--n_layer", "--n_head", "--n_embd", "--block_size")]
    proc = run("train.py", *base, "--dataset=tiny_char", "--init_from=out-nano/ckpt.pt", "--max_iters=3",
               "--eval_interval=3", "--out_dir=out-from-nano", cwd=workdir)
    assert "missing keys []" in proc.stdout


def test_nanogpt_meta_pkl_is_never_executed_and_a_missing_vocabulary_says_where_it_looked(tmp_path):
    class Payload:
        def __reduce__(self):
            return os.system, (f"touch {tmp_path / 'PWNED'}",)
    nanogpt_run(tmp_path, dict(vocab_size=10, itos=Payload()), 10)
    proc = run("sample.py", "--out_dir=out-nano", cwd=tmp_path, ok=False)
    assert "posix.system" in proc.stderr and "only plain data" in proc.stderr and not (tmp_path / "PWNED").exists()
    os.remove(tmp_path / "data" / "nano" / "meta.pkl")
    proc = run("convert.py", "--src=out-nano", "--out_dir=x", cwd=tmp_path, ok=False)
    assert "looked for" in proc.stderr and "--meta=" in proc.stderr and not (tmp_path / "x").exists()
    with open(tmp_path / "vocab.pkl", "wb") as f:  # --meta names it explicitly
        pickle.dump(dict(itos={i: chr(97 + i) for i in range(10)}), f)
    run("convert.py", "--src=out-nano", "--out_dir=x", "--meta=vocab.pkl", cwd=tmp_path)
    assert torch.load(tmp_path / "x" / "ckpt.pt", weights_only=True)["meta"]["vocab"][:3] == ["a", "b", "c"]


def test_bpe_and_gpt2_tokenizers_export_to_the_same_ids(tmp_path, monkeypatch):
    from test_prepare_bpe import small_tiktoken

    import hf_tokenizer as hf_interop
    from tokenizer import load_tokenizer
    (tmp_path / "t.txt").write_text("A tokenizer for tests: spaces,  tabs\t and ünïcode 😀.\n" * 40, encoding="utf-8")
    run("prepare_bpe.py", "--input=t.txt", "--vocab_size=300", cwd=tmp_path)
    d = tmp_path / "data" / "t_bpe"
    meta = json.loads((d / "meta.json").read_text())
    meta["tokenizer_json"] = (d / meta["tokenizer_file"]).read_text(encoding="utf-8")
    text = "Tokens, tabs\tand ünïcode 😀 — new words too.\n"
    for name, meta_, ours in [("bpe", meta, load_tokenizer(meta)), ("gpt2", dict(tokenizer="gpt2"), None)]:
        if name == "gpt2":  # GPT-2's BPE, derived from tiktoken's ranks (a small stand-in encoding here)
            enc = small_tiktoken()
            monkeypatch.setattr(hf_interop, "gpt2_encoding", lambda enc=enc: enc)
            ours = type("T", (), dict(encode=lambda self, s, enc=enc: enc.encode_ordinary(s)))()
        (tmp_path / name).mkdir()
        hf_interop.export_tokenizer(meta_, str(tmp_path / name), 64)
        hf = transformers.AutoTokenizer.from_pretrained(str(tmp_path / name))
        for s in (text, "the theme of the thing", "  two  spaces\n\nlines"):
            assert hf.encode(s) == ours.encode(s), (name, s)
            assert hf.decode(hf.encode(s)) == s


def test_plain_unpickler_reads_data_only():
    import io

    import nanogpt
    data = dict(vocab_size=3, itos={0: "a", 1: "b"}, stoi={"a": 0}, extra=[1.5, (2, None), b"x"])
    assert nanogpt.PlainUnpickler(io.BytesIO(pickle.dumps(data))).load() == data
    with pytest.raises(pickle.UnpicklingError):
        nanogpt.PlainUnpickler(io.BytesIO(pickle.dumps(dict(x=torch.zeros(1))))).load()


def test_warm_start_on_shorter_windows_keeps_the_context_and_refuses_to_grow_learned_positions(workdir):
    """A fine-tune's --block_size below the source's is its training window: the model keeps the source's context
    (nanoGPT would crop it); a longer one cannot grow learned positions."""
    base = [a for a in TINY if not a.startswith("--block_size")]
    run("train.py", *base, "--dataset=tiny_char", "--block_size=32", "--max_iters=2", "--out_dir=out-b32", cwd=workdir)
    proc = run("train.py", *base, "--dataset=tiny_char", "--block_size=16", "--max_iters=2", "--init_from=out-b32",
               "--out_dir=out-b16", cwd=workdir)
    saved = torch.load(workdir / "out-b16" / "ckpt.pt", weights_only=True)
    assert saved["model"]["transformer.wpe.weight"].shape[0] == 32 and saved["model_config"]["block_size"] == 32
    assert saved["config"]["block_size"] == 16 and "x 16 = " in proc.stdout and "context: 32" in proc.stdout
    proc = run("train.py", *base, "--dataset=tiny_char", "--block_size=64", "--max_iters=2", "--init_from=out-b32",
               "--out_dir=out-b64", cwd=workdir, ok=False)
    assert "--block_size=32 or less" in proc.stderr
