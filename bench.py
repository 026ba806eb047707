"""
Benchmarks, as medians of several runs with ratios against a baseline measured in the same session.

mode=train: each variant of train.py's arguments is run `runs` times (round-robin, so machine noise
spreads evenly); the table has val loss, bits per byte, training and wall time, ms/iter and tok/s.
mode=step / mode=sample: in-process timings of model variants (GPTConfig fields as --key=value, the shape
from `args`): one training step (forward, backward, AdamW) on random tokens, or KV-cached greedy decoding at batch 1
(--impl=transformers: transformers' generate() on the same weights; --impl=llama.cpp: llama.cpp on them as a GGUF
file, f32 or Q8_0 with --quantize=int8; each variant's tokens are checked against the baseline's); --model_spec
times a real model (gguf:FILE, hf:..., a run folder) instead of a random one of args' shape.

    python bench.py --args="config/char_tiny.py --eval_iters=200"
    python bench.py --args="config/shakespeare_char_cpu.py" --variants="['', '--optimizer=adamw']" --runs=3
    python bench.py --args="config/char_tiny.py" --grid="{'learning_rate': [1e-3, 3e-3], 'batch_size': [8, 16]}"
    python bench.py --mode=step --variants="['', '--mlp=relu2', '--n_kv_head=1', '--model_type=gpt_fast']"
    python bench.py --mode=sample --args="--n_layer=12 --n_head=12 --n_embd=768 --block_size=1024 --vocab_size=50257" \
        --variants="['', '--impl=transformers', '--compile=True', '--dtype=bfloat16']" --new_tokens=64
    python bench.py --mode=sample --model_spec=gguf:SmolLM2-135M-Instruct.Q4_1.gguf --new_tokens=64 \
        --variants="['--impl=llama.cpp', '', '--compile=True', '--impl=llama.cpp --quantize=int8', '--quantize=int8']"
    python bench.py --mode=step --device=cuda --batch_size=32 \
        --args="--block_size=1024 --vocab_size=50304 --n_layer=12 --n_head=12 --n_embd=768" \
        --variants="['--dtype=bfloat16 --compile=True', '--dtype=bfloat16 --compile=True --optimizer=muon']"
"""

import ast
import concurrent.futures
import csv
import gc
import itertools
import json
import math
import os
import re
import shlex
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import replace

import torch

from checkpoint import build_model, load_source, shortened
from configurator import POSITIVE, check, configure, parse_value
from errors import die
from generate import compile_decode, generate, generate_uncached
from hardware import DTYPES, autocast, gpu_peak, pick_device, pick_dtype
from model import GPT, MODEL_FIELDS, config_from_preset
from optimizers import make_optimizers
from peers import llama_cpp_decoder, scratch, transformers_decoder
from quantize import for_decoding
from training import Trainer

# -----------------------------------------------------------------------------
mode = "train"  # train | step | sample | serve
args = "config/char_tiny.py"  # train.py (step/sample: model fields; serve: serve.py) arguments shared by every variant
variants = [""]  # extra train.py arguments per variant; the first is the baseline
runs = 3  # runs per variant; the table shows medians
# train mode: a sweep, e.g. "{'learning_rate': [1e-3, 3e-3], 'batch_size': [16, 32]}": its product are the variants
grid = ""
# train mode: every run is written here, and runs it already holds are not run again ('' = sweep.csv with a grid)
results_csv = ""
batch_size = 12  # step/sample modes: sequences per step (sample: 1 sequence of block_size tokens)
steps = 30  # step mode: timed steps per run (after 5 warm-up steps)
# sample mode: tokens generated per run (variants: --use_cache=False, --compile=True, --batch=16, --dtype=bfloat16,
# --impl=transformers, --impl=llama.cpp (needs --model_spec), --quantize=int8)
new_tokens = 500
prefill = 0  # sample mode: also time a prompt of this many tokens and its first new token (prompt tokens/s)
# step/sample modes: cpu | cuda | mps (step variants: --dtype=bfloat16, --compile=True, --optimizer=muon)
device = "cpu"
clients = [1, 4, 16, 64]  # serve mode: concurrent streaming clients per load (args: serve.py's arguments)
model_spec = ""  # sample mode: a real model to time (gguf:FILE, hf:..., a run folder) instead of args' shape
peer = ""  # serve mode: a Hugging Face folder (convert.py --to=hf) whose transformers generate() is timed as the peer
# -----------------------------------------------------------------------------
# step mode: train.py's optimizer settings
TRAIN_OPTIMIZER = dict(learning_rate=1e-3, weight_decay=0.1, beta1=0.9, beta2=0.95, eps=1e-8, muon_lr=0.02,
                       muon_momentum=0.95, muon_weight_decay=0.0, muon_ns_steps=5)
# step/sample variants: not fields
VARIANT_OPTIONS = ("model_type", "dtype", "compile", "optimizer", "use_cache", "batch", "impl", "quantize")
HERE = os.path.dirname(os.path.abspath(__file__))  # the scripts it runs sit beside it; data/ is the working folder's


def sweep_variants(spec):
    """The variants of a grid: every combination of its values, as train.py arguments."""
    try:
        axes = ast.literal_eval(spec)
        assert isinstance(axes, dict) and axes and all(isinstance(v, (list, tuple)) and v for v in axes.values())
    except (ValueError, SyntaxError, AssertionError):
        die(f"--grid={spec!r} must be a dict of setting -> non-empty list, e.g. \"{{'learning_rate': [1e-3, 3e-3]}}\"")
    combinations = itertools.product(*axes.values())
    return [" ".join(f"--{k}={v}" for k, v in zip(axes, values, strict=True)) for values in combinations]


def one_run(extra):
    """Run train.py once in a scratch out_dir; return its figures."""
    with tempfile.TemporaryDirectory() as out:
        cmd = [sys.executable, os.path.join(HERE, "train.py"), *shlex.split(args), *shlex.split(extra),
               f"--out_dir={out}", "--overwrite=True"]
        t0 = time.time()
        proc = subprocess.run(cmd, capture_output=True, text=True)
        wall = time.time() - t0
        if proc.returncode:
            last = proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else ""
            die(f"train.py {args} {extra} failed: {last}")
        with open(os.path.join(out, "metrics.csv")) as f:
            rows = list(csv.DictReader(f))
    done = re.search(r"iterations, best val loss [\d.]+, ([\d.]+) s of training", proc.stdout)
    steps = [r for r in rows if r["ms_per_iter"]]
    last_eval = [r for r in rows if r["val_loss"]][-1]
    return dict(val_loss=float(last_eval["val_loss"]), val_loss_ema=float(last_eval.get("val_loss_ema") or "nan"),
                val_bpb=float([r for r in rows if r["val_bpb"]][-1]["val_bpb"]),
                train_s=float(done.group(1)) if done else float("nan"), wall_s=wall,
                ms_per_iter=statistics.median(float(r["ms_per_iter"]) for r in steps) if steps else float("nan"),
                tok_per_s=statistics.median(float(r["tok_per_s"]) for r in steps) if steps else float("nan"))


def options(text):
    """--key=value arguments as a dict of parsed values."""
    pairs = (a[2:].split("=", 1) for a in shlex.split(text) if a.startswith("--") and "=" in a)
    return {k: parse_value(v) for k, v in pairs}


def time_sample(run, batch, dev, sync):
    """(tokens/s over new_tokens, seconds for the first 8 tokens (compiling included), the tokens, and with prefill
    the prompt tokens/s of a prefill-token prompt and its first new token) of one decoder."""
    torch._dynamo.reset()  # as in a new process: no shapes remembered from other variants' graphs
    prompt = torch.zeros(batch, 1, dtype=torch.long, device=dev)
    t0 = time.perf_counter()
    run(prompt, 8)
    sync()
    warm, t0 = time.perf_counter() - t0, time.perf_counter()
    out = run(prompt, new_tokens)
    sync()
    speed, t0 = batch * new_tokens / (time.perf_counter() - t0), time.perf_counter()
    if prefill:  # a prompt of the vocabulary's ids in turn, and one new token after it
        run(torch.arange(prefill, device=dev)[None].expand(batch, -1) % 256, 1)
        sync()
    return speed, warm, out, batch * prefill / (time.perf_counter() - t0) if prefill else None


def time_step(model, dtype, optimizer, compiled, dev, sync):
    """Milliseconds per step of train.py's own step (training.Trainer: AdamW, fused on CUDA, or Muon; the grad
    scaler; clipping) on random tokens, after 5 warm-up steps."""
    optims = make_optimizers(model, dict(TRAIN_OPTIMIZER, optimizer=optimizer), dev.startswith("cuda"))[0]
    x = torch.randint(0, model.config.vocab_size, (batch_size, model.config.block_size), device=dev)
    trainer = Trainer(torch.compile(model) if compiled else model, model, optims,
                      torch.amp.GradScaler(dev.split(":")[0], enabled=dtype == "float16"), autocast(dev, dtype),
                      lambda split, it, k, b: (x, x), batch_size, 1, grad_clip=1.0)
    for i in range(5 + steps):
        if i == 5:
            sync()
            t0 = time.perf_counter()
        trainer.step(i, 1.0)
    sync()
    return (time.perf_counter() - t0) / steps * 1000


def bench_model():
    """Median step time (ms) or sampling speed (tokens/s) of each variant against the first."""
    dev = pick_device(device)
    sync = {"cuda": torch.cuda.synchronize, "mps": torch.mps.synchronize}.get(dev.split(":")[0], lambda: None)
    shape = dict(dict(n_layer=4, n_head=4, n_embd=128, block_size=64, vocab_size=65), **options(args))
    for text in [args, *variants]:  # every key is a model field or one of the variant options, before any run
        if unknown := sorted(set(options(text)) - set(MODEL_FIELDS) - set(VARIANT_OPTIONS)):
            die(f"{unknown[0]!r} in {text!r} is neither a model field (model.py GPTConfig) nor one of "
                f"{', '.join(VARIANT_OPTIONS)}")
    source, folder, context = load_source(model_spec) if model_spec else None, scratch(), max(1024, prefill + 1)
    if source and source.model_config["block_size"] > context:  # a real model's KV cache is allocated per run
        source = shortened(source, context)
    results, startup, memory, prompts = ({v: [] for v in variants} for _ in range(4))
    flops, floor = {}, []  # floor, sample mode: ms per token of the baseline model's matrix-vector products alone
    tokens, same = {}, {v: True for v in variants}  # sample mode: the tokens of each variant's first run
    for _ in range(runs):
        for v in variants:
            opts = {**shape, **options(v)}
            dtype = opts.pop("dtype", "float32")  # step: autocast, as train.py does; sample: the weights, as sample.py
            use_cache, compiled, batch = opts.pop("use_cache", True), opts.pop("compile", False), opts.pop("batch", 1)
            optimizer, impl, kind = opts.pop("optimizer", "adamw"), opts.pop("impl", "yocto"), opts.pop("quantize", "")
            torch.manual_seed(0)
            own = source and replace(source, model={k: v.clone() for k, v in source.model.items()})  # (trained)
            model = build_model(own, dev) if own else GPT(config_from_preset(opts.pop("model_type", "gpt"),
                                                                                   **opts)).to(dev)
            cfg = model.config  # auto: as train.py (step: the width and tokens per step) or sample.py would pick
            dtype = pick_dtype(dtype, dev, *((cfg.n_embd, batch_size * cfg.block_size) if mode == "step" else ()))
            if dev.startswith("cuda"):
                torch.cuda.reset_peak_memory_stats()
            if mode == "sample":  # new_tokens greedy from one token; the first 8 tokens warm up (and compile)
                model = model.to(DTYPES[dtype]) if impl != "yocto" else for_decoding(model.to(DTYPES[dtype]), kind)
                run = decoder(model, impl, compiled, use_cache, source, kind, folder.name)
                speed, warm, out, prompt_speed = time_sample(run, batch, dev, sync)
                results[v].append(speed)
                startup[v].append(warm)
                prompts[v].append(prompt_speed)
                base = tokens.setdefault(variants[0], out)  # every row: the baseline's first row's tokens
                same[v] &= all(row == base[0] for row in out)
                if v == variants[0]:
                    floor.append(gemv_ms(model, sync))
                continue
            results[v].append(time_step(model, dtype, optimizer, compiled, dev, sync))
            flops[v] = model.flops_per_token()  # training FLOPs per token, for MFU
            if dev.startswith("cuda"):
                memory[v].append(torch.cuda.max_memory_allocated() / 2**30)
            del model
    unit = "tokens/s" if mode == "sample" else "ms/step"
    base = statistics.median(results[variants[0]])
    gpu, peak = gpu_peak(dev)
    what = f"--model_spec={model_spec}" if model_spec else f"--args={args!r}"
    print(f"bench.py --mode={mode} {what} on {gpu or dev}, {torch.get_num_threads()} threads — medians of {runs} runs")
    extra = " tok/s | MFU | peak memory GiB |" if mode == "step" else (
        " first 8 tokens (s) | the baseline's tokens |" + (f" {prefill}-token prompt, tok/s |" if prefill else ""))
    print(f"| variant | {unit} | vs baseline |{extra}\n|---|---|---|" + "---|" * extra.count("|"))
    for v, r in results.items():
        m = statistics.median(r)
        if mode == "step":
            tok_s = batch_size * {**shape, **options(v)}["block_size"] / m * 1000
            mfu = f"{flops[v] * tok_s / peak:.1%}" if peak else "—"
            mem = f"{statistics.median(memory[v]):.1f}" if memory[v] else "—"
            extra = f" {tok_s:,.0f} | {mfu} | {mem} |"
        else:
            extra = f" {statistics.median(startup[v]):.2f} | {'yes' if same[v] else 'no'} |" + (
                f" {statistics.median(prompts[v]):,.0f} |" if prefill else "")
        print(f"| {v or 'baseline'} | {m:,.1f} | {m / base:.2f}x |{extra}")
    if floor:
        ms = statistics.median(floor)
        print(f"Bound at batch 1: the first variant's weight matrix-vector products alone take {ms:.3f} ms per token "
              f"(at most {1000 / ms:,.0f} tokens/s, {1000 / ms / base:.1f}x the first variant)")


def stream_one(url, prompt, tokens):
    """One streaming completion: (seconds to the first text, tokens made, error or None)."""
    body = json.dumps(dict(prompt=prompt, max_tokens=tokens, stream=True, stream_options=dict(include_usage=True)))
    t0, first, made = time.perf_counter(), None, 0
    try:
        request = urllib.request.Request(url + "/v1/completions", data=body.encode(),
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=600) as response:
            for line in response:
                if not line.startswith(b"data: {"):
                    continue
                event = json.loads(line[6:])
                if first is None and event["choices"] and event["choices"][0]["text"]:
                    first = time.perf_counter() - t0
                made = (event.get("usage") or {}).get("completion_tokens", made)
    except (OSError, ValueError) as e:
        return None, 0, f"{type(e).__name__}: {e}"
    return first, made, None if made == tokens else f"{made} of {tokens} tokens"


def bench_serve():
    """A load test of serve.py: for each number of concurrent streaming clients (round-robin over runs), each asking
    for new_tokens tokens: total tokens/s, time to the first token (median, p95) and errors; with --peer, the same
    requests through transformers' generate() served one at a time."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    command = [sys.executable, os.path.join(HERE, "serve.py"), *shlex.split(args), f"--port={port}",
               f"--max_batch={max(clients)}"]
    server = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        for _ in range(600):
            try:
                urllib.request.urlopen(url + "/health", timeout=1)
                break
            except OSError:
                if server.poll() is not None:
                    die(f"serve.py {args} failed: {server.stderr.read().strip().splitlines()[-1:]}")
                time.sleep(0.2)
        stream_one(url, "The ", 8)  # warm up
        gc.freeze()  # the load generator's own full collections (~100 ms with torch loaded) would count as latency
        rates, firsts, errors = ({c: [] for c in clients} for _ in range(3))
        for _ in range(runs):
            for c in clients:
                t0 = time.perf_counter()
                with concurrent.futures.ThreadPoolExecutor(c) as pool:
                    done = list(pool.map(lambda i: stream_one(url, "The ", new_tokens), range(c)))
                rates[c].append(sum(made for _, made, _ in done) / (time.perf_counter() - t0))
                firsts[c] += [first for first, _, err in done if first is not None]
                errors[c] += [err for *_, err in done if err]
                print(f"{c} clients: {rates[c][-1]:,.0f} tokens/s, {len(errors[c])} errors", file=sys.stderr)
    finally:
        server.terminate()
        server.wait()
    base = statistics.median(rates[clients[0]])
    print(f"serve.py {args} — {new_tokens} new tokens per client, medians of {runs} runs")
    print("| clients | total tokens/s | vs 1 client | first token median (s) | first token p95 (s) | errors |")
    print("|---|---|---|---|---|---|")
    for c in clients:
        ttft = sorted(firsts[c])
        p95 = ttft[min(len(ttft) - 1, int(0.95 * len(ttft)))] if ttft else float("nan")
        print(f"| {c} | {statistics.median(rates[c]):,.0f} | {statistics.median(rates[c]) / base:.1f}x | "
              f"{statistics.median(ttft) if ttft else float('nan'):.3f} | {p95:.3f} | {len(errors[c])} |")
    if peer:
        import transformers
        model = transformers.AutoModelForCausalLM.from_pretrained(peer).eval()
        ids = torch.tensor([[0]])
        times = []
        for _ in range(runs + 1):
            t0 = time.perf_counter()
            with torch.no_grad():
                model.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=True, top_k=0)
            times.append(time.perf_counter() - t0)
        t = statistics.median(times[1:])
        print(f"Peer: transformers generate() on {peer}, one request at a time: {new_tokens / t:,.0f} tokens/s for any "
              f"number of clients; the k-th of c waiting clients sees its first token after ~k x {t:.2f} s "
              f"(p95 at 16 clients ~{0.95 * 16 * t:.1f} s)")


def decoder(model, impl, compiled, use_cache, source, kind, folder):
    """run(prompt (B, 1), n) -> n greedy tokens after each row's prompt (B lists): the engine's generate() (or
    nanoGPT's loop without the cache), or a peer on the same weights (peers.py: transformers, llama.cpp)."""
    if impl == "yocto" and not use_cache:
        return lambda prompt, n: generate_uncached(model, prompt, n, temperature=0)
    if impl == "yocto":
        decode = compile_decode(model) if compiled else None
        return lambda prompt, n: generate(model, prompt, n, temperature=0, decode=decode)
    if impl == "transformers":
        return transformers_decoder(model, compiled, use_cache)
    if impl == "llama.cpp":
        return llama_cpp_decoder(source, kind, folder)
    die(f"--impl={impl!r}: yocto, transformers or llama.cpp")


def gemv_ms(model, sync, n=50):
    """Milliseconds for one token's pass through every nn.Linear weight of the model as a matrix-vector product and
    nothing else, each stored as decoding stores it (quantize.for_decoding): what batch-1 decoding costs at least,
    however little else it does (the weights stream from memory per token)."""
    weights = [m.weight.detach() for m in model.modules() if isinstance(m, torch.nn.Linear)]
    xs = [torch.randn(w.size(1), dtype=w.dtype, device=w.device) for w in weights]
    sync()
    t0 = time.perf_counter()
    for _ in range(n):
        for w, x in zip(weights, xs, strict=True):
            torch.mv(w, x)
    sync()
    return (time.perf_counter() - t0) / n * 1000


if __name__ == "__main__":
    configure(globals())
    if mode not in ("train", "step", "sample", "serve"):
        die(f"--mode={mode!r} is not one of train, step, sample, serve (prepare_bpe.py: bench_prepare.py)")
    check(globals(), dict(runs=POSITIVE, batch_size=POSITIVE, steps=POSITIVE, new_tokens=POSITIVE))
    if not variants or not all(isinstance(v, str) for v in variants):
        die(f"--variants={variants!r} must be a non-empty list of strings of train.py arguments, "
            f"e.g. \"['', '--n_layer=2']\"")
    if mode in ("step", "sample"):
        bench_model()
        raise SystemExit
    if mode == "serve":
        bench_serve()
        raise SystemExit
    if grid:
        variants = sweep_variants(grid)
    keys = ["val_loss", "val_bpb", "train_s", "wall_s", "ms_per_iter", "tok_per_s", "val_loss_ema"]
    csv_path = results_csv or ("sweep.csv" if grid else "")
    done = {}  # (variant, run) -> figures already in csv_path: a killed sweep resumes where it stopped
    if csv_path and os.path.isfile(csv_path):
        with open(csv_path, newline="", encoding="utf-8") as f:
            done = {(r["variant"], int(r["run"])): {k: float(r.get(k) or "nan") for k in keys}
                    for r in csv.DictReader(f)}
    results = {v: [] for v in variants}
    for i in range(runs):
        for v in variants:
            if (v, i) in done:
                results[v].append(done[(v, i)])
                continue
            results[v].append(r := one_run(v))
            print(f"run {i + 1}/{runs} [{v or 'baseline'}]: val loss {r['val_loss']:.4f}, "
                  f"{r['train_s']:.1f} s training, "
                  f"{r['wall_s']:.1f} s wall, {r['ms_per_iter']:.1f} ms/iter", file=sys.stderr, flush=True)
            if csv_path:
                new = not os.path.isfile(csv_path)
                with open(csv_path, "a", newline="", encoding="utf-8") as f:
                    writer = csv.DictWriter(f, fieldnames=["variant", "run", *keys])
                    if new:
                        writer.writeheader()
                    writer.writerow(dict(variant=v, run=i, **r))
    med = {v: {k: statistics.median(r[k] for r in rs) for k in keys} for v, rs in results.items()}
    if grid:  # best first
        med = dict(sorted(med.items(), key=lambda kv: kv[1]["val_loss"]))
    base = med[variants[0]]
    print(f"train.py {args} — medians of {runs} runs")
    print("| variant | val loss | val bpb | train s | wall s | ms/iter | tok/s | ms/iter vs baseline | "
          "val loss of the EMA |")
    print("|---|---|---|---|---|---|---|---|---|")
    for v, m in med.items():
        ema = "—" if math.isnan(m["val_loss_ema"]) else f"{m['val_loss_ema']:.4f}"
        print(f"| {v or 'baseline'} | {m['val_loss']:.4f} | {m['val_bpb']:.4f} | {m['train_s']:.1f} | "
              f"{m['wall_s']:.1f} | {m['ms_per_iter']:.1f} | {m['tok_per_s']:,.0f} | "
              f"{m['ms_per_iter'] / base['ms_per_iter']:.2f}x | {ema} |")
