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
