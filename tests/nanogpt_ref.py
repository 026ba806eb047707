"""nanoGPT's GPT as a reference for the tests, written from its architecture and not from our model.py: GPT-2's block
(LayerNorm before attention and before the MLP, with biases only when bias=True; causal self-attention through one
c_attn matrix; a 4x GELU MLP), learned positions, a final LayerNorm and the head tied to the token embedding, all
under nanoGPT's parameter names. It makes a checkpoint in nanoGPT's layout and gives the tokens nanoGPT's model
would, so the tests compare our reading of such a checkpoint with an implementation that shares no code with ours."""

import math

import torch
import torch.nn.functional as F


def init_state(args, seed):
    """Random weights in nanoGPT's names and shapes (its init: normal 0.02, c_proj scaled by the depth)."""
    gen, C, V, L = torch.Generator().manual_seed(seed), args["n_embd"], args["vocab_size"], args["n_layer"]

    def normal(*shape, std=0.02):
        return torch.randn(*shape, generator=gen) * std
    state = {"transformer.wte.weight": normal(V, C), "transformer.wpe.weight": normal(args["block_size"], C),
             "transformer.ln_f.weight": torch.ones(C)}
    for i in range(L):
        h, proj = f"transformer.h.{i}.", 0.02 / math.sqrt(2 * L)
        state |= {h + "ln_1.weight": torch.ones(C), h + "ln_2.weight": torch.ones(C),
                  h + "attn.c_attn.weight": normal(3 * C, C), h + "attn.c_proj.weight": normal(C, C, std=proj),
                  h + "mlp.c_fc.weight": normal(4 * C, C), h + "mlp.c_proj.weight": normal(C, 4 * C, std=proj)}
    if args["bias"]:
        state |= {k.replace(".weight", ".bias"): torch.zeros(v.shape[0]) for k, v in state.items()
                  if k.startswith("transformer.h.") or k == "transformer.ln_f.weight"}
    state["lm_head.weight"] = state["transformer.wte.weight"]  # tied
    return state


def forward(state, args, idx):
    """Logits (B, T, vocab) of token ids idx (B, T)."""
    T, C, nh = idx.size(1), args["n_embd"], args["n_head"]

    def p(name):
        return state.get(name)

    def layer_norm(x, name):
        return F.layer_norm(x, (C,), p(name + ".weight"), p(name + ".bias"), 1e-5)
    x = p("transformer.wte.weight")[idx] + p("transformer.wpe.weight")[:T]
    causal = torch.ones(T, T, dtype=torch.bool).tril()
    for i in range(args["n_layer"]):
        h = f"transformer.h.{i}."
        qkv = F.linear(layer_norm(x, h + "ln_1"), p(h + "attn.c_attn.weight"), p(h + "attn.c_attn.bias"))
        q, k, v = qkv.split(C, -1)
        q, k, v = (t.view(*t.shape[:2], nh, C // nh).transpose(1, 2) for t in (q, k, v))  # (B, nh, T, hs)
        att = (q @ k.transpose(-2, -1) / math.sqrt(C // nh)).masked_fill(~causal, float("-inf")).softmax(-1)
        y = (att @ v).transpose(1, 2).reshape(*x.shape)
        x = x + F.linear(y, p(h + "attn.c_proj.weight"), p(h + "attn.c_proj.bias"))
        m = F.gelu(F.linear(layer_norm(x, h + "ln_2"), p(h + "mlp.c_fc.weight"), p(h + "mlp.c_fc.bias")))
        x = x + F.linear(m, p(h + "mlp.c_proj.weight"), p(h + "mlp.c_proj.bias"))
    return F.linear(layer_norm(x, "transformer.ln_f"), p("lm_head.weight"))


@torch.no_grad()
def greedy(state, args, ids, n):
    """n greedy tokens after ids, the context cut to the last block_size tokens as nanoGPT's generate() cuts it."""
    ids = list(ids)
    for _ in range(n):
        ids.append(int(forward(state, args, torch.tensor([ids[-args["block_size"]:]]))[0, -1].argmax()))
    return ids[len(ids) - n:]
