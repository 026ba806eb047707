"""The model families people fine-tune, against transformers on tiny random models built here: Gemma 3 (both layer
kinds, a window shorter than the sequence), Qwen2 (q/k/v biases), Mistral (a sliding window), Phi-3 (fused
matrices). Each reads through hf:FOLDER with equal logits and cached greedy tokens (decoding past the window), and
exports back to a folder transformers loads with the same logits."""

import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("safetensors")

from checkpoint import build_model, load_source  # noqa: E402
from generate import generate  # noqa: E402
from hf import export_hf  # noqa: E402

V, T = 96, 40  # vocabulary, test sequence (longer than every window below)
COMMON = dict(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=64)
FAMILIES = {
    "gemma3": lambda: transformers.Gemma3ForCausalLM(transformers.Gemma3TextConfig(
        **COMMON, head_dim=16, sliding_window=6, layer_types=["sliding_attention", "sliding_attention",
                                                              "full_attention"],
        query_pre_attn_scalar=12, rope_theta=50000.0, rope_local_base_freq=100.0)),
    "qwen2": lambda: transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**COMMON, tie_word_embeddings=True)),
    "mistral": lambda: transformers.MistralForCausalLM(transformers.MistralConfig(**COMMON, sliding_window=7)),
    "phi3": lambda: transformers.Phi3ForCausalLM(transformers.Phi3Config(**COMMON, pad_token_id=0)),
}


def randomized(hf):
    """Random norm scales and biases too (a fresh model's are ones and zeros, which would hide a swapped tensor)."""
    with torch.no_grad():
        for p in hf.parameters():
            if p.dim() == 1:
                p.copy_(torch.randn_like(p) * 0.3 + (0 if "gemma" in type(hf).__name__.lower() else 1))
    return hf.eval()


@pytest.fixture(scope="module", params=list(FAMILIES))
def family(request, tmp_path_factory):
    torch.manual_seed(0)
    hf = randomized(FAMILIES[request.param]())
    folder = tmp_path_factory.mktemp(request.param) / "hf"
    hf.save_pretrained(folder)
    return request.param, hf, folder


def test_family_reads_with_the_same_logits_and_cached_greedy_tokens(family):
    name, hf, folder = family
    model = build_model(load_source(f"hf:{folder}"), "cpu").eval()
    x = torch.randint(0, V, (2, T), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert (model(x, x)[0] - hf(x).logits).abs().max().item() <= 1e-4
        prompt = x[:1, :5]
        theirs = hf.generate(prompt, max_new_tokens=25, do_sample=False, pad_token_id=0)[:, 5:].tolist()
    assert generate(model, prompt, 25, temperature=0) == theirs  # the KV cache goes 30 tokens, past every window
    if name in ("gemma3", "mistral"):
        assert model.config.window in (6, 7) and model.config.window_pattern in ("SSL", "S")


def test_family_exports_to_a_folder_transformers_loads_with_the_same_logits(family, tmp_path):
    name, hf, folder = family
    source = load_source(f"hf:{folder}")
    export_hf(source, str(tmp_path / "out"))
    back = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "out")).eval()
    x = torch.randint(0, V, (2, T), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert (back(x).logits - hf(x).logits).abs().max().item() <= 1e-4


# the two chat formats of these families (written here, in the shape of the models' own templates): Gemma's turns with
# "model" for the assistant and the system prompt folded into the first user turn; Qwen's ChatML with a default system
GEMMA_TEMPLATE = (
    "{{ bos_token }}{% set first = messages[0]['content'] + '\n\n' if messages[0]['role'] == 'system' else '' %}"
    "{% for m in messages if m['role'] != 'system' %}<start_of_turn>{{ 'model' if m['role'] == 'assistant' else "
    "m['role'] }}\n{{ first if loop.first else '' }}{{ m['content'] | trim }}<end_of_turn>\n{% endfor %}"
    "{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}")
CHATML_TEMPLATE = (
    "{% if messages[0]['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
CHATS = {"gemma3": (GEMMA_TEMPLATE, ["<bos>", "<eos>", "<start_of_turn>", "<end_of_turn>"], "<end_of_turn>"),
         "qwen2": (CHATML_TEMPLATE, ["<|endoftext|>", "<|im_start|>", "<|im_end|>"], "<|im_end|>")}


@pytest.mark.parametrize("name", CHATS)
def test_family_chat_template_renders_as_transformers_and_masks_only_the_replies(name, tmp_path):
    """A Gemma-style and a ChatML chat model read through hf:: its conversation ids equal transformers'
    apply_chat_template, the SFT mask covers each reply and its end of turn (and nothing else), and a reply stops at
    the end-of-turn token."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    from chat_templates import template_for
    from conftest import corpus_text
    from tokenizer import check_tokenizer
    template, specials, end = CHATS[name]
    raw = Tokenizer(models.BPE())
    raw.pre_tokenizer, raw.decoder = pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel()
    raw.train_from_iterator([corpus_text()[:5000]], trainers.BpeTrainer(
        vocab_size=300, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False))
    names = dict(bos_token="<bos>", eos_token="<eos>") if name == "gemma3" else dict(eos_token="<|endoftext|>")
    hf_tok = transformers.PreTrainedTokenizerFast(tokenizer_object=raw, chat_template=template, **names)
    config = dict(COMMON, vocab_size=raw.get_vocab_size(), eos_token_id=[hf_tok.eos_token_id,
                                                                          raw.token_to_id(end)])
    model = (transformers.Gemma3ForCausalLM(transformers.Gemma3TextConfig(**config, head_dim=16)) if name == "gemma3"
             else transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**config)))
    model.generation_config.update(do_sample=True, temperature=0.3, top_p=0.9)  # the model's recommended sampling
    model.save_pretrained(tmp_path)
    hf_tok.save_pretrained(tmp_path)
    source = load_source(f"hf:{tmp_path}")
    assert source.meta["generation"] == dict(temperature=0.3, top_p=0.9)
    tok = check_tokenizer(source.meta)
    ours = template_for(source.meta, tok)
    chat = [dict(role="system", content="Be brief."), dict(role="user", content="Hi there"),
            dict(role="assistant", content="Hello!"), dict(role="user", content="Name a colour."),
            dict(role="assistant", content="Blue.")]
    assert ours.encode(chat) == hf_tok.apply_chat_template(chat, tokenize=True, return_dict=False)
    assert ours.encode(chat[:2], True) == hf_tok.apply_chat_template(chat[:2], add_generation_prompt=True,
                                                                      tokenize=True, return_dict=False)
    ids, mask = ours.encode_masked(chat)
    kept = tok.decode([i for i, m in zip(ids, mask, strict=True) if m])
    assert kept.replace("\n", "") == f"Hello!{end}Blue.{end}"
    assert raw.token_to_id(end) in ours.stop_ids


def test_a_request_that_leaves_sampling_out_samples_as_the_model_recommends():
    """serve.py's requests: a field left out (or null) takes the model's generation_config.json value, one given wins,
    and the API's own default applies where the model recommends nothing."""
    from api import params_of
    recommended = dict(temperature=0.3, top_p=0.9)
    assert recommended.items() <= params_of({}, 100, recommended).sampling.items()
    assert params_of(dict(temperature=0.7, top_p=None), 100, recommended).sampling["temperature"] == 0.7
    assert params_of(dict(top_p=None), 100, recommended).sampling["top_p"] == 0.9
    assert params_of({}, 100, {}).sampling["temperature"] == 1.0
