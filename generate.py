"""
The generation engine beside the model (as nanochat keeps engine.py beside gpt.py): the KV cache with a position per
row, one forward step, the sampler, and the one batched engine that every script that generates drives: rows
admitted and released, a full row refilled with its newest half block, per-row generators, stop ids and stop
strings, text streamed as it becomes final.

    python -c "import torch, generate, model; m = model.GPT(model.GPTConfig(n_layer=2, vocab_size=65)); \
print(generate.generate(m, [[0]], 8, temperature=0))"
"""

import copy
import queue
from functools import partial

import torch

from configurator import ABOVE_ZERO, FRACTION, NON_NEGATIVE, POSITIVE, SEED, UNIT
from tokenizer import TextStream


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


def compile_decode(model):
    """step() compiled for one-token decoding. On a CPU the span the step attends over is set before each call (a
    compiled graph cannot read it from pos); it changes at the second token, so torch.compile builds a second graph
    where the span (and the batch, in a server) may be any size: two compiles per run, then none. Each graph is
    called from C++ (inductor's cpp_wrapper), not Python, which pays at every shape measured (BENCHMARKS.md). On a
    GPU the step attends over the whole block: one graph of fixed shapes, and no wait for the device to read the
    span."""
    whole = next(model.parameters()).device.type != "cpu"
    compiled = torch.compile(partial(step, model), dynamic=False if whole else None,
                             options=None if whole else {"cpp_wrapper": True})

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


# the sampling settings of every script that generates (sample.py, chat.py): name -> (default, rule, comment)
SAMPLING_SETTINGS = dict(
    max_new_tokens=(500, POSITIVE, "tokens to generate (per sample, or per reply)"),
    temperature=(0.8, NON_NEGATIVE, "1.0 = the model's distribution, lower = more conservative, 0 = greedy"),
    top_k=(200, NON_NEGATIVE, "sample from the k likeliest tokens only (0 = all)"),
    top_p=(1.0, UNIT, "nucleus sampling: the smallest set of tokens whose probability reaches p (1.0 = off)"),
    min_p=(0.0, FRACTION, "drop tokens less likely than min_p times the likeliest one (0 = off)"),
    repetition_penalty=(1.0, ABOVE_ZERO, "> 1 makes tokens already in the text less likely (CTRL's; 1.0 = off)"),
    no_repeat_ngram_size=(0, NON_NEGATIVE, "n > 0: never repeat an n-gram of the text (0 = off)"),
    seed=(1337, SEED, "random seed (the same seed and settings give the same text)"))
SAMPLING_RULES = {name: rule for name, (_, rule, _) in SAMPLING_SETTINGS.items()}
DECODE_SETTINGS = dict(compile=(False, None, "torch.compile the one-token decode step (start-up cost, then faster "
                                             "tokens)"))


def sampling_of(settings):
    """sample_next's controls from a script's settings."""
    return dict(temperature=settings["temperature"], top_k=settings["top_k"] or None, top_p=settings["top_p"],
                min_p=settings["min_p"], repetition_penalty=settings["repetition_penalty"],
                no_repeat_ngram_size=settings["no_repeat_ngram_size"])


def padded(rows):
    """Token id lists of different lengths as one (B, T) tensor, left-padded with -1."""
    width = max(len(r) for r in rows)
    return torch.tensor([[-1] * (width - len(r)) + list(r) for r in rows])


class Sequence:
    """One sequence for the engine: its token ids (the prompt, then each new token), how it is sampled and when it
    stops (a stop id, a stop string, max_new_tokens), and with a tokenizer its text as it becomes final. A seed gives
    it a generator of its own (the same text in any batch); without one it shares the engine's. `finish` is None while
    it runs, then "stop", "length" or "error: ..."; `owner` is the caller's (serve.py: where its text goes)."""

    def __init__(self, ids, max_new_tokens, sampling=None, stop_ids=(), tokenizer=None, stops=(), seed=None,
                 owner=None):
        if not len(ids):
            raise ValueError("every prompt needs at least one token")
        self.ids, self.max_new_tokens, self.sampling = [int(i) for i in ids], max_new_tokens, dict(sampling or {})
        self.stop_ids, self.seed, self.owner = {int(i) for i in stop_ids}, seed, owner
        self.stream = TextStream(tokenizer, stops) if tokenizer is not None else None
        self.tokens, self.generator, self.finish, self.cancelled = [], None, None, False

    @property
    def text(self):
        return self.stream.text if self.stream else ""

    def add(self, token):
        """Take the next token; return the text that became final (a stop id adds no text)."""
        self.ids.append(token)
        self.tokens.append(token)
        text = ""
        if token in self.stop_ids:
            self.finish = "stop"
        elif self.stream is not None:
            text = self.stream.push(token)
            self.finish = "stop" if self.stream.stopped else None
        if self.finish is None and len(self.tokens) >= self.max_new_tokens:
            self.finish = "length"
        return text + (self.stream.flush() if self.finish and self.stream is not None else "")


class Engine:
    """Continuous batching over the per-row KV cache: live sequences hold rows 0..n-1 and decode together, one token
    per step; admit() prefills new prompts into the free rows (prompts of one length in one forward); a finished or
    cancelled sequence leaves at once, the last row moving into its place; a row that fills its block_size slots is
    refilled with its newest half block. `decode` runs the one-token steps (compile_decode()'s, say)."""

    def __init__(self, model, rows, decode=None, generator=None):
        weights = next(model.parameters())
        self.model, self.block, self.device, self.max_rows = model, model.config.block_size, weights.device, rows
        self.cache = KVCache(model.config, rows, self.device, weights.dtype)
        self.decode = decode or partial(step, model)
        self.generator = generator or torch.Generator(device=self.device)
        if generator is None:
            self.generator.seed()  # sequences without a seed sample from a random stream
        self.live, self.held = [], []  # sequences in row order; tokens in each row's cache, as Python ints

    @torch.no_grad()
    def warm_up(self):
        """Run the decode step on 1, 2 and 3 rows, so that a compiled one builds its graphs (one for any batch and
        span after the first) before the first sequence rather than during it."""
        rows = range(1, min(3, self.max_rows) + 1)
        for n in rows:
            self.decode(torch.zeros(n, 1, dtype=torch.long, device=self.device), self.cache.rows(0, n))
        for b in rows:
            self.cache.reset(b - 1)

    @torch.no_grad()
    def admit(self, sequences):
        """Prefill each prompt but its newest token (the last block_size tokens of it) into the next free row."""
        if len(self.live) + len(sequences) > self.max_rows:
            raise ValueError(f"{len(sequences)} sequences do not fit the {self.max_rows - len(self.live)} free rows")
        for length in sorted({len(s.ids[-self.block:]) for s in sequences}):
            group, first = [s for s in sequences if len(s.ids[-self.block:]) == length], len(self.live)
            for s in group:
                self.cache.reset(len(self.live))
                if s.seed is not None:
                    s.generator = torch.Generator(device=self.device).manual_seed(s.seed)
                self.live.append(s)
                self.held.append(length - 1)
            if length > 1:
                prompts = torch.tensor([s.ids[-self.block:-1] for s in group], device=self.device)
                step(self.model, prompts, self.cache.rows(first, first + len(group)))

    @torch.no_grad()
    def step(self):
        """One token for every live sequence: [(sequence, token, text that became final)]; the sequences that
        finished (or were cancelled) leave their rows."""
        for i, s in enumerate(self.live):
            if self.held[i] == self.block:  # a full row: refilled with its newest half block
                ids = s.ids[-(self.block // 2):]
                prefill(self.model, self.cache, i, torch.tensor(ids[:-1], device=self.device))
                self.held[i] = len(ids) - 1
        n = len(self.live)
        last = torch.tensor([[s.ids[-1]] for s in self.live], device=self.device)
        tokens = self.sample(self.decode(last, self.cache.rows(0, n)))  # (n, vocab) logits -> n token ids
        events = []
        for i, (s, token) in enumerate(zip(self.live, tokens, strict=True)):
            self.held[i] += 1
            if not s.cancelled:
                events.append((s, token, s.add(token)))
        for i in reversed(range(n)):
            if self.live[i].cancelled or self.live[i].finish:
                self.release(i)
        return events

    def sample(self, logits):
        """Every row's next token: rows that share a generator and their sampling settings in one sample_next call."""
        tokens, groups = [None] * len(self.live), {}
        for i, s in enumerate(self.live):
            groups.setdefault((id(s.generator), tuple(sorted(s.sampling.items()))), []).append(i)
        for rows in groups.values():
            first = self.live[rows[0]]
            history = first.sampling.get("repetition_penalty", 1.0) != 1.0 or first.sampling.get("no_repeat_ngram_size")
            seen = padded([self.live[i].ids for i in rows]).to(self.device) if history else None
            picked = sample_next(logits[rows], seen=seen, generator=first.generator or self.generator, **first.sampling)
            for i, token in zip(rows, picked.tolist(), strict=True):
                tokens[i] = token
        return tokens

    def release(self, i):
        """Free row i: the last live row moves into it."""
        last = len(self.live) - 1
        if i != last:
            self.cache.move(last, i)
            self.live[i], self.held[i] = self.live[last], self.held[last]
        self.live.pop()
        self.held.pop()

    def serve(self, waiting, stop, deliver):
        """Decode whatever comes into the queue `waiting` until the event `stop` is set, handing every step's events
        to deliver(events). An error in a step (out of memory, say) ends each live sequence with it; the rest go on."""
        while not stop.is_set():
            new = []
            while len(self.live) + len(new) < self.max_rows:  # whoever waits, up to the free rows; idle: wait
                try:
                    s = waiting.get_nowait() if self.live or new else waiting.get(timeout=0.2)
                except queue.Empty:
                    break
                if not s.cancelled:
                    new.append(s)
            try:
                self.admit(new)
                if self.live:
                    deliver(self.step())
            except Exception as e:
                for s in self.live:
                    s.finish = f"error: {type(e).__name__}: {str(e)[:200]}"
                deliver([(s, None, "") for s in self.live])
                self.live, self.held = [], []


@torch.no_grad()
def generate_stream(model, sequences, decode=None, generator=None):
    """Run sequences (Sequence objects) to their ends together, a row each, on one Engine: yields (sequence, token,
    text) as each token comes. The model is in eval mode meanwhile."""
    was_training = model.training
    model.eval()
    try:
        engine = Engine(model, len(sequences), decode, generator)
        engine.admit(sequences)
        while engine.live:
            yield from engine.step()
    finally:
        model.train(was_training)


def generate(model, prompts, max_new_tokens, stop_ids=(), decode=None, generator=None, **sampling):
    """The new token ids of each prompt (a list of id lists, or a (B, T) tensor) as a list of B lists, each ending at
    its first stop id (kept) or after max_new_tokens. `sampling` goes to sample_next."""
    sequences = [Sequence(torch.as_tensor(p).tolist(), max_new_tokens, sampling, stop_ids) for p in prompts]
    for _ in generate_stream(model, sequences, decode, generator):
        pass
    return [s.tokens for s in sequences]


@torch.no_grad()
def generate_uncached(model, prompts, max_new_tokens, generator=None, **sampling):
    """nanoGPT's generation, the reference the engine is tested against: the last block_size tokens of every row
    through the whole model for each new token, no cache. prompts (B, T); returns the new ids as B lists."""
    idx = torch.as_tensor(prompts, device=next(model.parameters()).device)
    for _ in range(max_new_tokens):
        logits = model(idx[:, -model.config.block_size:])[0][:, -1]
        idx = torch.cat([idx, sample_next(logits, generator=generator, seen=idx, **sampling)[:, None]], dim=1)
    return idx[:, idx.size(1) - max_new_tokens:].tolist()
