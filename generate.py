"""
The generation engine beside the model (as nanochat keeps engine.py beside gpt.py): the KV cache with a position
per row, one forward step, the sampler, and streaming generation. sample.py, chat.py and bench.py use it.

    python -c "import torch, generate, model; m = model.GPT(model.GPTConfig(n_layer=2, vocab_size=65)); \
print(generate.generate(m, torch.zeros(1, 1, dtype=torch.long), 8, temperature=0))"
"""

import copy
from functools import partial

import torch


class KVCache:
    """Keys and values of every layer, block_size slots per row. Row b holds pos[b] tokens; a forward writes its
    tokens at slots pos[b], pos[b]+1, ... and attends over every slot up to its own, so rows may hold sequences of
    different lengths, and one row can be reset and refilled while the others go on. A step attends over the slots
    in use only, up to the longest row (`span`): reading the cache is most of a batched decode step's time on a CPU.
    Each layer has its own tensors, written in place (torch.compile then writes the new slots, not a copy of the
    cache). Only n_kv_head heads are stored: grouped-query attention shrinks the cache by n_head / n_kv_head. One
    slot more than a row can fill is kept, never read: the span's view of the slots is then never the whole tensor,
    which would be contiguous, and torch.compile would build one more graph for that one span (block_size)."""

    def __init__(self, cfg, batch_size, device, dtype=torch.float32):
        shape = (batch_size, cfg.n_kv_head, cfg.block_size + 1, cfg.head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(cfg.n_layer)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(cfg.n_layer)]
        self.pos = torch.zeros(batch_size, dtype=torch.long, device=device)  # (B,) tokens stored in each row
        self.history = torch.full((batch_size, max(cfg.ngram_emb - 1, 0)), -1, dtype=torch.long, device=device)
        self.block, self.span = cfg.block_size, cfg.block_size

    def start(self, T):
        """Before a forward of T tokens: their positions in every row (B, T) and the slots each may attend to, its
        own and earlier ones (B, 1, T, span). The span is read from pos here, or set before a compiled step."""
        positions = self.pos[:, None] + torch.arange(T, device=self.pos.device)
        if not torch.compiler.is_compiling():
            self.set_span(T)
        return positions, positions[:, None, :, None] >= torch.arange(self.span, device=self.pos.device)

    def set_span(self, T):
        self.span = min(int(self.pos.max()) + T, self.block)

    def update(self, layer, k, v, positions):
        """Write k, v (B, n_kv_head, T, hs) at `positions` (B, T); return `layer`'s keys and values in the slots this
        step attends over: (B, n_kv_head, span, hs) each."""
        rows = torch.arange(k.size(0), device=k.device)[:, None]  # (B, 1), with positions: the slots to write
        for cache, new in ((self.k[layer], k), (self.v[layer], v)):
            cache.transpose(1, 2)[rows, positions] = new.transpose(1, 2).to(cache.dtype)
        return self.k[layer][:, :, :self.span], self.v[layer][:, :, :self.span]

    def advance(self, idx):
        """After a forward over idx (B, T): T more tokens in every row, and the n-gram history moves on."""
        self.pos.add_(idx.size(1))
        if self.history.size(1):
            self.history.copy_(torch.cat([self.history, idx], dim=1)[:, -self.history.size(1):])

    def rows(self, start, stop):
        """Rows start..stop-1 alone, sharing this cache's memory: a forward through them fills those rows only (a
        prefill of one row, or a decode step of the first n)."""
        view = copy.copy(self)
        view.k, view.v = [t[start:stop] for t in self.k], [t[start:stop] for t in self.v]
        view.pos, view.history = self.pos[start:stop], self.history[start:stop]
        return view

    def move(self, src, dst):
        """Row src's sequence into row dst (a server keeps its live rows first)."""
        for t in self.k + self.v:
            t[dst] = t[src]
        self.pos[dst], self.history[dst] = self.pos[src], self.history[src]

    def reset(self, b):
        """Empty row b (its old keys stay in memory, hidden: a slot is read only after it is written again)."""
        self.pos[b] = 0
        self.history[b] = -1

    def nbytes(self):
        return sum(t.nbytes for t in self.k + self.v)


def step(model, idx, cache):
    """Logits (B, vocab) of the last position of idx (B, T), which continues the sequences the cache holds."""
    return model(idx, cache=cache)[0][:, -1]


def compile_decode(model, cpp_wrapper=True):
    """step() compiled for one-token decoding. On a CPU the span the step attends over is set before each call (a
    compiled graph cannot read it from pos); it changes at the second token, so torch.compile builds a second graph
    where the span (and the batch, in a server) may be any size: two compiles per run, then none. Each graph is
    called from C++ (inductor's cpp_wrapper), not Python: 1-8% more tokens/s at GPT-2 small, 5-15% at smaller
    shapes, ~10 s more to compile the first time. On a GPU the step attends over the whole block: one graph of fixed
    shapes, and no wait for the device to read the span."""
    whole = next(model.parameters()).device.type != "cpu"
    compiled = torch.compile(partial(step, model), dynamic=False if whole else None,
                             options=None if whole else {"cpp_wrapper": cpp_wrapper})

    def run(idx, cache):
        if whole:
            cache.span = cache.block
        else:
            cache.set_span(idx.size(1))
        return compiled(idx, cache)
    return run


def prefill(model, cache, b, ids):
    """Empty row b and fill it with ids (T,) (at most block_size): a new sequence joins the batch, the others go on."""
    cache.reset(b)
    if len(ids):
        step(model, ids[None], cache.rows(b, b + 1))


def sample_next(logits, temperature=1.0, top_k=None, top_p=None, min_p=None, repetition_penalty=1.0,
                no_repeat_ngram_size=0, generator=None, seen=None):
    """Pick the next token from logits (B, vocab), given the tokens so far (seen, (B, T), -1 where a shorter row is
    padded). First the repetition penalty (CTRL's: a seen token's logit divided by it if positive, multiplied if
    negative) and the ban on tokens that would repeat an n-gram of the text; then greedy at temperature 0, else
    sampling after the top-k, top-p (the smallest set reaching p) and min-p (at least min_p times the likeliest's
    probability) cuts. Returns (B,) token ids."""
    if seen is not None and repetition_penalty != 1.0:
        was_seen = torch.zeros_like(logits).scatter_add_(1, seen.clamp(min=0), (seen >= 0).to(logits.dtype)) > 0
        penalised = torch.where(logits > 0, logits / repetition_penalty, logits * repetition_penalty)
        logits = torch.where(was_seen, penalised, logits)
    n = no_repeat_ngram_size
    if seen is not None and n and seen.size(1) >= n:
        grams = seen.unfold(1, n, 1)  # (B, W, n): every n-gram of the text
        tail = seen[:, seen.size(1) - n + 1:][:, None, :]  # (B, 1, n-1): the text's end
        repeats = (grams[:, :, :-1] == tail).all(-1) & (grams >= 0).all(-1)  # same n-1 tokens as the end
        banned = torch.zeros_like(logits).scatter_add_(1, grams[:, :, -1].clamp(min=0), repeats.to(logits.dtype)) > 0
        kept = logits.masked_fill(banned, float("-inf"))
        logits = torch.where(kept.isneginf().all(-1, keepdim=True), logits, kept)  # a row with no way out: no ban
    if temperature <= 0:
        return logits.argmax(dim=-1)
    logits = logits / temperature
    if top_k is not None and 0 < top_k < logits.size(-1):
        kth = torch.topk(logits, top_k, dim=-1).values[:, [-1]]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and 0 < top_p < 1:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(dim=-1)
        drop = probs.cumsum(dim=-1) - probs >= top_p  # keep tokens until the mass before them reaches p
        drop[:, 0] = False  # and always the likeliest (a p below float precision would drop it too)
        logits = logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    if min_p:
        probs = logits.softmax(dim=-1)
        logits = logits.masked_fill(probs < min_p * probs.max(dim=-1, keepdim=True).values, float("-inf"))
    return torch.multinomial(logits.softmax(dim=-1), num_samples=1, generator=generator)[:, 0]


def controls(settings):
    """The sampling settings generate_stream takes, from a script's settings (sample.py's, chat.py's)."""
    return dict(temperature=settings["temperature"], top_k=settings["top_k"] or None, top_p=settings["top_p"],
                min_p=settings["min_p"], repetition_penalty=settings["repetition_penalty"],
                no_repeat_ngram_size=settings["no_repeat_ngram_size"])


def padded(rows):
    """Token id lists of different lengths as one (B, T) tensor, left-padded with -1."""
    width = max(len(r) for r in rows)
    return torch.stack([torch.cat([r.new_full((width - len(r),), -1), r]) for r in rows])


@torch.no_grad()
def generate_stream(model, prompts, max_new_tokens, eos_id=None, use_cache=True, decode=None, **sampling):
    """Yield the next token of every row, a (B,) tensor at a time. prompts: (B, T) token ids, or a list of B id
    lists of any lengths (each row then gives the tokens it would give alone). `sampling` goes to sample_next.
    Stops once every row has produced eos_id (one id, or a list: a chat template's end-of-turn ids). With the KV
    cache each prompt but its last token is prefilled into its row, then the rows decode together one token at a
    time (`decode`, say compile_decode()'s, runs those steps); a row that fills its block_size slots is refilled
    with its newest half block. Without the cache (use_cache=False, nanoGPT's way) the whole context goes through
    the model at every token."""
    was_training = model.training
    model.eval()
    weights = next(model.parameters())
    rows = [torch.as_tensor(p, dtype=torch.long, device=weights.device) for p in prompts]
    if not all(len(r) for r in rows):
        raise ValueError("every prompt needs at least one token")
    B, L = len(rows), model.config.block_size
    same = len({len(r) for r in rows}) == 1  # one (B, T) tensor: prefilled in one forward
    cache = KVCache(model.config, B, weights.device, weights.dtype) if use_cache else None
    held = [0] * B  # tokens in each cache row, as Python ints: which rows need a refill, known without a sync
    run = decode or partial(step, model)
    finished = torch.zeros(B, dtype=torch.bool, device=weights.device)
    stops = torch.tensor([] if eos_id is None else [eos_id] if isinstance(eos_id, int) else list(eos_id),
                         dtype=torch.long, device=weights.device)
    try:
        for i in range(max_new_tokens):
            if not use_cache:
                logits = torch.cat([model(torch.stack(rows)[:, -L:])[0][:, -1]] if same else
                                   [model(r[-L:][None])[0][:, -1] for r in rows])
            else:
                if i == 0 and same and len(rows[0]) > 1:
                    step(model, torch.stack(rows)[:, -L:-1], cache)
                    held = [min(len(rows[0]), L) - 1] * B
                for b in [b for b in range(B) if (i == 0 and not same) or held[b] == L]:
                    ids = rows[b][-(L if i == 0 else L // 2):]
                    prefill(model, cache, b, ids[:-1])
                    held[b] = len(ids) - 1
                logits = run(torch.stack([r[-1:] for r in rows]), cache)  # (B, vocab) after each row's newest token
                held = [h + 1 for h in held]
            next_id = sample_next(logits, seen=torch.stack(rows) if same else padded(rows), **sampling)  # (B,)
            rows = [torch.cat([r, t[None]]) for r, t in zip(rows, next_id, strict=True)]
            yield next_id
            if len(stops):
                finished |= torch.isin(next_id, stops)
                if finished.all():
                    break
    finally:
        model.train(was_training)


def generate(model, prompts, max_new_tokens, **kwargs):
    """Like generate_stream, but returns the prompts (B, T) with the new tokens appended."""
    new = list(generate_stream(model, prompts, max_new_tokens, **kwargs))
    return torch.cat([torch.as_tensor(prompts)] + [t[:, None] for t in new], dim=1)
