"""
The GPT language model, with every architecture variant behind a GPTConfig field.

The default config is the GPT-2 block (learned positions, LayerNorm, GELU MLP, biases, tied embeddings) with nanoGPT's
parameter names, so nanoGPT checkpoints load as they are (convert.py maps Hugging Face GPT-2 and Llama weights to and
from these names). The presets in PRESETS bundle the modern variants (RoPE, RMSNorm, SwiGLU/ReLU², GQA, QK-norm, logit
soft-capping); each is chosen once in __init__, so forward passes read the same for all.

    python -c "from model import GPT, GPTConfig; print(GPT(GPTConfig(n_layer=2)))"
"""

import math
from dataclasses import dataclass, fields
from functools import partial

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from crossentropy import chunked_cross_entropy


@dataclass
class GPTConfig:
    vocab_size: int = 50304  # tokens in the vocabulary (GPT-2's 50257 padded up to a multiple of 64)
    block_size: int = 1024  # longest context the model sees
    n_layer: int = 12  # transformer blocks
    n_head: int = 12  # query heads per attention layer
    n_kv_head: int = 0  # key/value heads (grouped-query attention); 0 = n_head, 1 = multi-query
    n_embd: int = 768  # width of the residual stream
    head_dim: int = 0  # width of each attention head; 0 = n_embd // n_head (Qwen3 sets it apart)
    dropout: float = 0.0  # dropout on attention weights and residual branches (0.0 for pretraining)
    bias: bool = True  # biases in Linear layers and LayerNorms (GPT-2: True)
    qkv_bias: bool = False  # biases on the q, k, v projections even where bias=False (Qwen2/2.5)
    tie_weights: bool = True  # share the token embedding with the lm_head
    pos_emb: str = "learned"  # position encoding: "learned" (GPT-2) | "rope" (rotary, on q and k)
    rope_theta: float = 10000.0  # RoPE base frequency
    norm: str = "layernorm"  # "layernorm" | "rmsnorm"
    norm_affine: bool = True  # learnable scale (and LayerNorm bias when bias=True) in every norm
    norm_eps: float = 0.0  # epsilon of every norm; 0 = torch's default (1e-5 LayerNorm, float eps RMSNorm)
    # "gelu" (exact, nanoGPT) | "gelu_tanh" (OpenAI GPT-2's) | "swiglu" (Llama) | "geglu_tanh" (Gemma: gated, tanh
    # GELU) | "relu2" (modded-nanogpt)
    mlp: str = "gelu"
    mlp_hidden: int = 0  # MLP hidden width; 0 = 4*n_embd (gelu, relu2) or 8/3*n_embd rounded up to 64 (gated)
    qk_norm: bool = False  # RMS-normalise q and k per head before attention
    qk_norm_scale: bool = False  # with qk_norm: a learned scale per head dimension (Qwen3's q_norm / k_norm)
    logit_softcap: float = 0.0  # if > 0, logits = cap * tanh(logits / cap)
    post_norm: bool = False  # also normalise each block's attention and MLP outputs before adding them (Gemma 3)
    scale_emb: bool = False  # multiply the token embeddings by sqrt(n_embd) (Gemma)
    attn_scale: float = 0.0  # attention's query scale; 0 = 1/sqrt(head_dim) (Gemma 3: query_pre_attn_scalar**-0.5)
    window: int = 0  # sliding-window attention: a query sees itself and the window-1 tokens before it; 0 = off
    # with window: the kind of each layer, the pattern repeated over the layers: S = sliding window, L = long (full
    # causal) attention; "S" all windowed (Mistral), "SSSSSL" (Gemma 3), "SSSL" (nanochat)
    window_pattern: str = "S"
    rope_local_theta: float = 0.0  # RoPE base of the sliding-window layers; 0 = rope_theta (Gemma 3: 10,000 vs 1e6)
    attn_impl: str = "sdpa"  # "sdpa" (fused kernels where the device has them) | "manual" (reference)
    grad_checkpoint: bool = False  # recompute each block's activations in backward (training only)
    # n >= 2: also embed the 2-, 3-, ..., n-grams ending at each token (hashed tables, summed into the input)
    ngram_emb: int = 0
    # rows of each n-gram table; n-grams are hashed modulo this (bigrams are exact while vocab*(vocab+1) fits)
    ngram_rows: int = 8191
    init_std: float = 0.02  # std of the normal init of weights; residual projections get std/sqrt(2*n_layer)

    def __post_init__(self):
        self.n_kv_head = self.n_kv_head or self.n_head
        if not self.head_dim and self.n_head >= 1 and self.n_embd % self.n_head:
            raise ValueError(f"n_embd={self.n_embd} must be divisible by n_head={self.n_head} (or set head_dim)")
        self.head_dim = self.head_dim or self.n_embd // max(self.n_head, 1)
        if not self.mlp_hidden:
            self.mlp_hidden = 64 * math.ceil(8 * self.n_embd / 3 / 64) if self.mlp in GATED else 4 * self.n_embd
        self.validate()

    def describe(self):
        """The resolved architecture in one line, for logs and run names."""
        return (f"{self.n_layer}L {self.n_embd}d {self.n_head}h/{self.n_kv_head}kv {self.pos_emb} {self.norm}"
                f"{'' if self.norm_affine else '(no scale)'} {self.mlp}({self.mlp_hidden}) bias={self.bias} "
                f"tie={self.tie_weights}{' qk_norm' if self.qk_norm else ''}{'(scaled)' if self.qk_norm_scale else ''}"
                f"{f' head_dim={self.head_dim}' if self.head_dim * self.n_head != self.n_embd else ''}"
                f"{f' softcap={self.logit_softcap:g}' if self.logit_softcap else ''}"
                f"{f' ngram={self.ngram_emb}x{self.ngram_rows}' if self.ngram_emb else ''}"
                f"{' qkv_bias' if self.qkv_bias else ''}{' post_norm' if self.post_norm else ''}"
                f"{' scale_emb' if self.scale_emb else ''}"
                f"{f' attn_scale={self.attn_scale:g}' if self.attn_scale else ''}"
                f"{f' window={self.window}:{self.window_pattern}' if self.window else ''}"
                f"{f' rope_local_theta={self.rope_local_theta:g}' if self.rope_local_theta else ''} {self.attn_impl}")

    def is_local(self, layer):
        """Whether layer attends through the sliding window."""
        return self.window > 0 and self.window_pattern[layer % len(self.window_pattern)] == "S"

    def validate(self):
        """Check every field once; raise ValueError with a message that names the bad value."""
        choices = dict(pos_emb=POS_EMBS, norm=NORMS, mlp=ACTIVATIONS, attn_impl=ATTENTIONS)
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name}={getattr(self, name)!r} is not one of {', '.join(map(repr, allowed))}")
        for name in ("vocab_size", "block_size", "n_layer", "n_head", "n_kv_head", "n_embd", "mlp_hidden"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be a positive integer")
        if self.n_head % self.n_kv_head:
            raise ValueError(f"n_head={self.n_head} must be divisible by n_kv_head={self.n_kv_head}")
        if self.pos_emb == "rope" and self.head_dim % 2:
            raise ValueError(f"rope needs an even head size, got head_dim={self.head_dim}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout={self.dropout} must be in [0, 1)")
        if self.ngram_emb == 1 or self.ngram_emb < 0 or self.ngram_rows < 1:
            raise ValueError(f"ngram_emb={self.ngram_emb} must be 0 (off) or >= 2, and ngram_rows={self.ngram_rows} "
                             f">= 1")
        if self.ngram_emb and self.vocab_size * (self.vocab_size + 1) ** (self.ngram_emb - 1) >= 2**63:
            raise ValueError(f"ngram_emb={self.ngram_emb} is too long for vocab_size={self.vocab_size} (the n-gram ids "
                             f"overflow int64); use a smaller ngram_emb")
        if self.logit_softcap < 0 or self.norm_eps < 0 or self.rope_theta <= 0 or self.init_std <= 0:
            raise ValueError("logit_softcap and norm_eps must be >= 0, rope_theta and init_std > 0")
        if self.window < 0 or self.attn_scale < 0 or self.rope_local_theta < 0:
            raise ValueError("window, attn_scale and rope_local_theta must be >= 0 (0 = off)")
        if not self.window_pattern or set(self.window_pattern) - set("SL"):
            raise ValueError(f"window_pattern={self.window_pattern!r} must be letters S (sliding window) and L (full "
                             f"attention), e.g. 'SSSL'")


# Presets: bundles of fields that a run may still override one by one (see train.py's model_type).
PRESETS = {
    "gpt": {},  # the GPT-2 block
    "gpt_plus": dict(pos_emb="rope", norm="rmsnorm", mlp="swiglu", bias=False),  # accuracy
    # speed: RoPE's quality, LayerNorm's fused kernel, cheap ReLU²
    "gpt_fast": dict(pos_emb="rope", mlp="relu2", bias=False),
}
MODEL_FIELDS = [f.name for f in fields(GPTConfig)]


def config_from_dict(fields):
    """GPTConfig from a stored dict (a checkpoint's model_config); keys that are not fields are ignored."""
    return GPTConfig(**{k: v for k, v in fields.items() if k in MODEL_FIELDS})


def config_from_preset(model_type, **overrides):
    """GPTConfig from a preset name plus field overrides (None values are ignored)."""
    if model_type not in PRESETS:
        raise ValueError(f"model_type={model_type!r} is not one of {', '.join(map(repr, PRESETS))}")
    return GPTConfig(**{**PRESETS[model_type], **{k: v for k, v in overrides.items() if v is not None}})


# -----------------------------------------------------------------------------
# building blocks, each chosen by name in __init__


def layer_norm(cfg, dim):
    return nn.LayerNorm(dim, eps=cfg.norm_eps or 1e-5, elementwise_affine=cfg.norm_affine,
                        bias=cfg.bias and cfg.norm_affine)


def rms_norm(cfg, dim, affine=None):
    return nn.RMSNorm(dim, eps=cfg.norm_eps or None, elementwise_affine=cfg.norm_affine if affine is None else affine)


NORMS = {"layernorm": layer_norm, "rmsnorm": rms_norm}


def gated(act, x):
    gate, value = x.chunk(2, dim=-1)  # the MLP's first matmul makes both: (..., 2 * mlp_hidden)
    return act(gate) * value


ACTIVATIONS = {"gelu": F.gelu, "gelu_tanh": partial(F.gelu, approximate="tanh"), "swiglu": partial(gated, F.silu),
               "geglu_tanh": partial(gated, partial(F.gelu, approximate="tanh")), "relu2": lambda x: F.relu(x).square()}
GATED = ("swiglu", "geglu_tanh")
POS_EMBS = ("learned", "rope")


def sdpa_attention(q, k, v, mask, dropout_p, scale=None):
    # q: (B, n_head, Tq, hs); k, v: (B, n_kv_head, Tk, hs); mask: None (causal), (Tq, Tk) or (B, 1, Tq, Tk) bool;
    # scale: of the scores, None = 1/sqrt(hs)
    if q.size(2) == 1 and q.device.type == "cpu" and torch.compiler.is_compiling():  # decoding: inductor fuses the
        return manual_attention(q, k, v, mask, dropout_p, scale)  # explicit form; SDPA's kernel is ~50 us a call
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p, scale=scale,
                                          is_causal=mask is None, enable_gqa=q.size(1) != k.size(1))


def manual_attention(q, k, v, mask, dropout_p, scale=None):
    # the reference that tests compare SDPA against: explicit scores, causal mask and softmax; the query heads grouped
    # by the key/value head they share, so grouped-query attention reads k and v as stored, with no copy
    B, nh, Tq, hs = q.shape
    q = q.view(B, k.size(1), nh // k.size(1), Tq, hs)
    att = (q @ k.unsqueeze(2).transpose(-2, -1)) * (scale or 1 / math.sqrt(hs))  # (B, nkv, groups, Tq, Tk)
    if mask is None:
        mask = torch.ones(Tq, k.size(2), dtype=torch.bool, device=q.device).tril()
    att = att.masked_fill(~(mask if mask.dim() == 2 else mask[:, :, None]), float("-inf")).softmax(dim=-1)
    att = F.dropout(att, p=dropout_p)
    return (att @ v.unsqueeze(2)).view(B, nh, Tq, hs)


ATTENTIONS = {"sdpa": sdpa_attention, "manual": manual_attention}


def rope_tables(head_size, length, theta):
    """cos and sin tables for rotary embeddings, each (length, head_size/2), in float32."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_size, 2, dtype=torch.float32) / head_size)
    angles = torch.outer(torch.arange(length, dtype=torch.float32), inv_freq)
    return angles.cos(), angles.sin()


def apply_rope(x, cos, sin):
    # x: (B, nh, T, hs); cos, sin: (T, hs/2). Rotates pairs (x1[i], x2[i]) of the two halves.
    x1, x2 = x.float().chunk(2, dim=-1)
    out = torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)
    return out.type_as(x)


def no_rope(x, cos, sin):
    return x


def band(mask, positions, window):
    """The sliding-window mask: where `mask` (None: causal over positions (T,); else (B, 1, T, span) over a KV cache's
    slots, positions (B, T)) allows and the key is less than `window` positions back."""
    if mask is None:
        back = positions[:, None] - positions  # (T, T)
        return (back >= 0) & (back < window)
    return mask & (positions[:, None, :, None] - torch.arange(mask.size(-1), device=mask.device) < window)


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg, layer):
        super().__init__()
        self.layer, self.n_head, self.n_kv_head = layer, cfg.n_head, cfg.n_kv_head
        self.head_size, self.scale = cfg.head_dim, cfg.attn_scale or None
        self.local = int(cfg.is_local(layer))  # which of the forward's (rope tables, mask) pairs: full or windowed
        # one matmul for q (n_head heads), k and v (n_kv_head heads each): nanoGPT's name and shape for plain MHA
        self.c_attn = nn.Linear(cfg.n_embd, (cfg.n_head + 2 * cfg.n_kv_head) * self.head_size,
                                bias=cfg.bias or cfg.qkv_bias)
        self.c_proj = nn.Linear(cfg.n_head * self.head_size, cfg.n_embd, bias=cfg.bias)
        self.q_norm = rms_norm(cfg, self.head_size, affine=cfg.qk_norm_scale) if cfg.qk_norm else nn.Identity()
        self.k_norm = rms_norm(cfg, self.head_size, affine=cfg.qk_norm_scale) if cfg.qk_norm else nn.Identity()
        self.rope = apply_rope if cfg.pos_emb == "rope" else no_rope
        self.attend = ATTENTIONS[cfg.attn_impl]
        self.dropout = cfg.dropout
        self.resid_dropout = nn.Dropout(cfg.dropout)

    def forward(self, x, ctx, cache=None, positions=None):
        """x (B, T, C); ctx: the rotary tables and mask of full attention and of the window (the forward's). With a
        KV cache, x continues its rows at `positions` (B, T) and attends where the mask (B, 1, T, span) allows: its
        own and earlier positions (of them the last `window`, in a windowed layer)."""
        B, T, C = x.size()
        hs, (cos, sin, mask) = self.head_size, ctx[self.local]
        q, k, v = self.c_attn(x).split([self.n_head * hs, self.n_kv_head * hs, self.n_kv_head * hs], dim=2)
        q = self.rope(self.q_norm(q.view(B, T, self.n_head, hs).transpose(1, 2)), cos, sin)  # (B, nh, T, hs)
        k = self.rope(self.k_norm(k.view(B, T, self.n_kv_head, hs).transpose(1, 2)), cos, sin)  # (B, nkv, T, hs)
        v = v.view(B, T, self.n_kv_head, hs).transpose(1, 2)  # (B, nkv, T, hs)
        if cache is not None:  # attend over the whole cache (mask None: plain causal attention over this chunk)
            k, v = cache.update(self.layer, k, v, positions)
            q = q.to(k.dtype)
        y = self.attend(q, k, v, mask, self.dropout if self.training else 0.0, self.scale)  # (B, nh, T, hs)
        y = y.transpose(1, 2).contiguous().view(B, T, self.n_head * hs)
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        width = 2 * cfg.mlp_hidden if cfg.mlp in GATED else cfg.mlp_hidden  # a gated c_fc: the gate and the value
        self.c_fc = nn.Linear(cfg.n_embd, width, bias=cfg.bias)
        self.act = ACTIVATIONS[cfg.mlp]
        self.c_proj = nn.Linear(cfg.mlp_hidden, cfg.n_embd, bias=cfg.bias)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x):
        return self.dropout(self.c_proj(self.act(self.c_fc(x))))


class Block(nn.Module):
    def __init__(self, cfg, layer):
        super().__init__()
        self.ln_1 = NORMS[cfg.norm](cfg, cfg.n_embd)
        self.attn = CausalSelfAttention(cfg, layer)
        self.ln_2 = NORMS[cfg.norm](cfg, cfg.n_embd)
        self.mlp = MLP(cfg)
        post = (lambda: NORMS[cfg.norm](cfg, cfg.n_embd)) if cfg.post_norm else nn.Identity  # Gemma's sandwich
        self.post_attn_norm, self.post_mlp_norm = post(), post()

    def forward(self, x, ctx, cache=None, positions=None):
        x = x + self.post_attn_norm(self.attn(self.ln_1(x), ctx, cache, positions))
        x = x + self.post_mlp_norm(self.mlp(self.ln_2(x)))
        return x


class GPT(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.config = cfg
        self.init_seed = int(torch.randint(2**62, (), device="cpu"))  # init_weights draws from it (on any device)
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(cfg.vocab_size, cfg.n_embd),
            wpe=nn.Embedding(cfg.block_size, cfg.n_embd) if cfg.pos_emb == "learned" else None,
            nte=nn.ModuleList([nn.Embedding(cfg.ngram_rows, cfg.n_embd) for _ in range(max(cfg.ngram_emb - 1, 0))]),
            drop=nn.Dropout(cfg.dropout),
            h=nn.ModuleList([Block(cfg, i) for i in range(cfg.n_layer)]),
            ln_f=NORMS[cfg.norm](cfg, cfg.n_embd),
        ))
        self.lm_head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        if cfg.tie_weights:
            self.transformer.wte.weight = self.lm_head.weight  # https://paperswithcode.com/method/weight-tying
        # rotary tables (the windowed layers' own with rope_local_theta), positions: derived, not in the state dict
        for name in ("rope_cos", "rope_sin", "rope_local_cos", "rope_local_sin", "rope_index"):
            self.register_buffer(name, None, persistent=False)
        if not self.lm_head.weight.is_meta:  # (on the meta device: parallel.shard calls it once the model is sharded)
            self.init_weights()

    @torch.no_grad()
    def init_weights(self, assign=torch.Tensor.copy_):
        """Every parameter and buffer from scratch, drawn in CPU memory from init_seed in a fixed order: normal
        matrices (GPT-2's residual projections get std/sqrt(2*n_layer)), zero biases, unit norm scales, the rotary
        tables. assign(param, whole value) puts each in place: parallel.shard passes one that keeps this process's
        shard, for a model built on the meta device, so a sharded model starts from one process's weights."""
        cfg, g = self.config, torch.Generator().manual_seed(self.init_seed)
        self.tie_and_tables()
        for name, p in self.named_parameters():
            std = cfg.init_std / math.sqrt(2 * cfg.n_layer) if name.endswith("c_proj.weight") else cfg.init_std
            whole = torch.empty(p.shape, device="cpu").normal_(0.0, std, generator=g) if p.dim() >= 2 else (
                torch.zeros(p.shape, device="cpu") if name.endswith("bias") else torch.ones(p.shape, device="cpu"))
            assign(p, whole)

    def tie_and_tables(self):
        """The head tied to the embedding (Module.to_empty and load_state_dict(assign=True) untie them; FSDP keeps them
        tied) and the rotary tables, on the weights' device."""
        cfg = self.config
        if cfg.tie_weights:
            self.transformer.wte.weight = self.lm_head.weight
        local = rope_tables(cfg.head_dim, cfg.block_size, cfg.rope_local_theta) if cfg.rope_local_theta else (None,) * 2
        tables = *rope_tables(cfg.head_dim, cfg.block_size, cfg.rope_theta), *local, torch.arange(cfg.block_size)
        (self.rope_cos, self.rope_sin, self.rope_local_cos, self.rope_local_sin,
         self.rope_index) = (None if t is None else t.to(self.lm_head.weight.device) for t in tables)

    def num_params(self, non_embedding=True):
        """Parameter count; by default without the position embedding (as nanoGPT reports it)."""
        n = sum(p.numel() for p in self.parameters())
        return n - (self.transformer.wpe.weight.numel() if non_embedding and self.transformer.wpe is not None else 0)

    def flops_per_token(self, window=0):
        """Training FLOPs per token (forward + backward) on windows of `window` tokens (0: block_size): 6 per weight
        plus attention (PaLM, appendix B)."""
        cfg = self.config
        lookups = sum(p.numel() for p in self.transformer.nte.parameters())  # n-gram tables: no matmul
        return 6 * (self.num_params() - lookups) + 12 * cfg.n_layer * cfg.n_embd * (window or cfg.block_size)

    def forward(self, idx, targets=None, cache=None, label_smoothing=0.0, return_logits=True):
        """idx: (B, T) token ids. With targets (B, T), returns logits (B, T, vocab) and the mean cross-entropy (targets
        of -1 are ignored), or with return_logits=False None and the loss, computed a chunk at a time without the
        logits (crossentropy.py); without targets, the logits of the last position only (B, 1, vocab) and None. With
        a KVCache (generate.py), idx continues the sequences its rows hold, each at its own position."""
        B, T = idx.size()
        if cache is None and T > self.config.block_size:
            raise ValueError(f"sequence of length {T} is longer than block_size={self.config.block_size}")
        positions, mask, history = self.rope_index[:T], None, idx.new_full((B, max(self.config.ngram_emb - 1, 0)), -1)
        if cache is not None:  # every row at its own position: (B, T), and the slots each query may see
            (positions, mask), history = cache.start(T), cache.history  # (B, T), (B, 1, T, span)

        # embeddings: tokens, learned positions, n-gram tables
        x = self.transformer.wte(idx)  # (B, T, C)
        if self.config.scale_emb:
            x = x * math.sqrt(self.config.n_embd)
        if self.transformer.wpe is not None:
            x = x + self.transformer.wpe(positions)
        for table, ids in zip(self.transformer.nte, self.ngram_ids(idx, history), strict=True):
            x = x + table(ids)
        x = self.transformer.drop(x)

        # the blocks
        ctx = self.attention_context(positions, mask)
        for block in self.transformer.h:
            if self.config.grad_checkpoint and self.training:
                x = checkpoint(block, x, ctx, use_reentrant=False)
            else:
                x = block(x, ctx, cache, positions)
        if cache is not None:
            cache.advance(idx)

        # the head: logits in fp32 for a stable softmax, only the last position's when there are no targets
        if targets is not None and not return_logits:
            h, cap = self.transformer.ln_f(x), self.config.logit_softcap
            return None, chunked_cross_entropy(h, self.lm_head.weight, targets, cap, label_smoothing)
        logits = self.lm_head(self.transformer.ln_f(x if targets is not None else x[:, [-1], :])).float()
        if self.config.logit_softcap:
            logits = self.config.logit_softcap * torch.tanh(logits / self.config.logit_softcap)
        if targets is None:
            return logits, None
        loss = F.cross_entropy(logits.view(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-1, reduction="sum",
                               label_smoothing=label_smoothing) / (targets != -1).sum().clamp(min=1)  # 0 if all ignored
        return logits, loss

    def attention_context(self, positions, mask):
        """(cos, sin, mask) of full attention, and of the sliding window where the model has one: the rotary tables at
        positions, (1|B, 1, T, hs/2) each, and the mask (None: causal)."""
        table = lambda t: t[positions].unsqueeze(-3)
        ctx = [(table(self.rope_cos), table(self.rope_sin), mask)]
        if self.config.window:
            local = (self.rope_local_cos, self.rope_local_sin) if self.config.rope_local_theta else ctx[0][:2]
            ctx.append((*(table(t) if self.config.rope_local_theta else t for t in local),
                        band(mask, positions, self.config.window)))
        return ctx

    def ngram_ids(self, idx, history):
        """Table rows of the 2-, ..., n-grams ending at each token of idx (B, T), given the n-1 tokens before
        it (history, (B, n-1); -1 where the sequence had not started). Each n-gram's id is exact in int64,
        then hashed modulo ngram_rows. Returns n-1 tensors (B, T)."""
        V, T = self.config.vocab_size, idx.size(1)
        seq = torch.cat([history, idx], dim=1) + 1  # (B, n-1+T), 0 = before the start
        ids, code, scale = [], idx, V
        for k in range(1, self.config.ngram_emb):  # add the k-th previous token
            code = code + scale * seq[:, -T - k:seq.size(1) - k]
            scale *= V + 1
            ids.append(code % self.config.ngram_rows)
        return ids
