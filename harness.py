"""
Scoring a model, whatever its tokenizer: lm-evaluation-harness's LM interface over our model (the harness's own task
logic, its numbers), and bits per byte on any text. Not run by itself.
"""

import logging
import math
import sys

import torch
from tqdm import tqdm

from errors import die
from generate import Sequence, generate_stream

try:  # optional at run time: eval.py says what to install before anything needs it
    from lm_eval.api.model import TemplateLM
    from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
except ImportError:
    TemplateLM = object


def prefix_id(tokenizer):
    """The token an empty context stands for (the harness's prefix): BOS, else EOS, else a newline's first token."""
    for i in (tokenizer.bos_id, tokenizer.eos_id):
        if i is not None:
            return i
    try:
        return tokenizer.encode("\n")[0]
    except (ValueError, IndexError):
        return 0


@torch.no_grad()
def loglikelihoods(model, pairs, batch_size):
    """(log-probability of the continuation, whether greedy decoding gives it) for each (context ids, continuation
    ids) pair, scored on (context + continuation)[-(block_size + 1):][:-1] as the harness's Hugging Face model does;
    longest first, in right-padded batches."""
    block, device = model.config.block_size, next(model.parameters()).device
    order = sorted(range(len(pairs)), key=lambda i: -len(pairs[i][0]) - len(pairs[i][1]))
    results = [None] * len(pairs)
    for start in tqdm(range(0, len(order), batch_size), desc="scoring", unit="batch", leave=False,
                      disable=not sys.stderr.isatty()):  # (on a terminal only)
        batch = order[start:start + batch_size]
        rows = [(pairs[i][0] + pairs[i][1])[-(block + 1):][:-1] for i in batch]
        x = torch.tensor([r + [0] * (len(rows[0]) - len(r)) for r in rows], device=device)  # (B, T), longest first
        logprobs = model(x, torch.zeros_like(x))[0].float().log_softmax(-1)  # (B, T, vocab)
        for b, i in enumerate(batch):
            target = torch.tensor(pairs[i][1], device=device)
            scores = logprobs[b, len(rows[b]) - len(target):len(rows[b])]  # (len(continuation), vocab)
            results[i] = (scores.gather(1, target[:, None]).sum().item(), bool((scores.argmax(-1) == target).all()))
    return results


class YoctoLM(TemplateLM):
    """lm-evaluation-harness's view of a yoctoGPT model: the harness tokenizes through tok_encode (our tokenizer, char,
    BPE or GPT-2's) and asks for log-likelihoods of continuations, rolling log-likelihoods of documents and greedy
    generations; contexts longer than block_size are cut from the left, as its Hugging Face model cuts them."""

    def __init__(self, model, tokenizer, batch_size=16, template=None):
        super().__init__()
        self.model, self.tokenizer, self.batch_size, self.template = model.eval(), tokenizer, batch_size, template
        self.max_length = model.config.block_size

    @property
    def eot_token_id(self):
        return self.tokenizer.eos_id if self.tokenizer.eos_id is not None else self.prefix_token_id

    @property
    def prefix_token_id(self):
        return prefix_id(self.tokenizer)

    @property
    def tokenizer_name(self):
        return "yoctogpt"

    def tok_encode(self, string, add_special_tokens=None, **kwargs):
        # a chat-templated context holds the template's special tokens as text: parse them, as transformers does
        return (self.tokenizer.encode_chat if self.template else self.tokenizer.encode)(string)

    def _loglikelihood_tokens(self, requests, disable_tqdm=False, override_bs=None):
        results = loglikelihoods(self.model, [(c, t) for _, c, t in requests], override_bs or self.batch_size)
        for (key, _, _), result in zip(requests, results, strict=True):
            if key is not None:
                self.cache_hook.add_partial("loglikelihood", key, result)
        return results

    def loglikelihood_rolling(self, requests, disable_tqdm=False):
        out = []
        for (text,) in [r.args for r in requests]:
            windows = get_rolling_token_windows(token_list=self.tok_encode(text), prefix_token=self.prefix_token_id,
                                                max_seq_len=self.max_length, context_len=1)
            pairs = [make_disjoint_window(w) for w in windows]
            out.append(sum(ll for ll, _ in loglikelihoods(self.model, pairs, self.batch_size)))
            self.cache_hook.add_partial("loglikelihood_rolling", (text,), out[-1])
        return out

    def generate_until(self, requests, disable_tqdm=False):
        out = []
        for context, kwargs in [r.args for r in requests]:
            until = kwargs.get("until") or []
            until, most = [until] if isinstance(until, str) else list(until), int(kwargs.get("max_gen_toks", 256))
            ids = self.tok_encode(context)[-max(self.max_length - most, 1):] or [self.prefix_token_id]
            stop_ids = [self.tokenizer.eos_id] if self.tokenizer.eos_id is not None else []
            reply = Sequence(ids, most, dict(temperature=0), stop_ids, self.tokenizer, until)
            for _ in generate_stream(self.model, [reply]):
                pass
            out.append(reply.text)
            self.cache_hook.add_partial("generate_until", (context, kwargs), out[-1])
        return out

    def apply_chat_template(self, chat_history, add_generation_prompt=True):
        return self.template.render(chat_history, add_generation_prompt)


MANAGERS = {}  # include_path -> the harness's TaskManager


def task_manager(tasks, include_path=""):
    """The harness's TaskManager, once every task is known to it; one line for a missing harness or task."""
    try:
        from lm_eval.tasks import TaskManager
    except ImportError:
        die("evaluating on tasks needs lm-evaluation-harness: pip install lm-eval")
    for name in ("lm_eval", "lm-eval", "datasets", "huggingface_hub"):
        logging.getLogger(name).setLevel(logging.ERROR)
    if include_path not in MANAGERS:  # it indexes the harness's thousands of task files: once per process
        MANAGERS[include_path] = TaskManager(include_path=include_path or None)
    manager = MANAGERS[include_path]
    unknown = [t for t in tasks if t not in manager.all_tasks]
    if unknown:
        die(f"unknown task {unknown[0]!r}; `python -m lm_eval ls tasks` lists the harness's, and a folder of local "
            f"task YAMLs (--include_path) adds yours")
    return manager


def run_tasks(lm, tasks, limit=None, num_fewshot=None, include_path="", chat=False, samples=False):
    """lm-evaluation-harness's simple_evaluate on our LM: its results dict; one line for a task that cannot run."""
    manager = task_manager(tasks, include_path)
    from lm_eval import simple_evaluate
    try:
        return simple_evaluate(model=lm, tasks=list(tasks), limit=limit, num_fewshot=num_fewshot, task_manager=manager,
                               apply_chat_template=chat, log_samples=samples, verbosity="ERROR",
                               bootstrap_iters=0)
    except Exception as e:  # a task whose data must be downloaded, offline; a broken local task
        first = (str(e).strip().splitlines() or [""])[0][:200]
        die(f"the tasks could not run ({type(e).__name__}: {first}); a task whose data must be downloaded needs the "
            f"network once (it is cached), while local task YAMLs (--include_path) work offline")


def table(results):
    """The harness's own results table."""
    from lm_eval.utils import make_table  # (run_tasks has checked that the harness is installed)
    return make_table(results)


def task_scores(model, tokenizer, tasks, limit, include_path="", batch_size=16):
    """{task: its main score} on `limit` items of each task (train.py's eval_tasks); the model back in training mode."""
    result = run_tasks(YoctoLM(model, tokenizer, batch_size), tasks, limit, include_path=include_path)
    model.train()
    return {task: value for task, (_, value) in main_scores(result).items()}


def main_scores(results):
    """{task: (metric, value)}: each task's first reported metric (acc, or the perplexity task's)."""
    scores = {}
    for task, values in results["results"].items():
        metric = next((k for k in values if "," in k and not k.split(",")[0].endswith("_stderr")), None)
        if metric is not None:
            scores[task] = (metric.split(",")[0], values[metric])
    return scores


@torch.no_grad()
def text_scores(model, tokenizer, text, stride, batch_size=16):
    """(loss per token, bits per byte, tokens scored) of the model on a text: windows of block_size + 1 tokens
    every `stride` tokens, each token after the first scored once with the most context its window gives (the
    first window's as train.py's evaluation scores it). Bits per byte: the nats over the UTF-8 bytes of the scored
    tokens, / ln 2, comparable across tokenizers."""
    ids, block = tokenizer.encode(text), model.config.block_size
    if len(ids) < 2:
        die("the text is shorter than two tokens; give a longer one")
    pairs, done, start = [], 1, 0
    while done < len(ids):
        end = min(start + block + 1, len(ids))
        pairs.append((ids[start:done], ids[done:end]))
        done, start = end, start + stride
    nats = -sum(ll for ll, _ in loglikelihoods(model, pairs, batch_size))
    nbytes = sum(tokenizer.token_bytes()[t] for t in ids[1:])
    return nats / (len(ids) - 1), nats / max(nbytes, 1) / math.log(2), len(ids) - 1
