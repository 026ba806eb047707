"""
Train a GPT: one flat loop with mixed precision, gradient accumulation, AdamW or Muon, a cosine or
warmup-stable-decay LR schedule, exact resume, and DDP when launched by torchrun.

    python train.py config/char_tiny.py                      # the quick start (CPU)
    python train.py config/char_tiny.py --device=mps --batch_size=32
    python train.py config/char_tiny.py --init_from=resume --max_iters=3000
    python train.py config/finetune_shakespeare.py            # fine-tune OpenAI's GPT-2 (init_from=gpt2)
    torchrun --standalone --nproc_per_node=8 train.py        # the defaults: a GPT-2-small-class run
"""

import os
import signal
import sys
import time
from contextlib import nullcontext

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from tqdm import tqdm

from checkpoint import (
    build_model,
    load_source,
    resolve_checkpoint,
    restore_training,
    resumed_config,
    rng_states,
    save_checkpoint,
    save_sharded,
)
from configurator import ABOVE_ZERO, FRACTION, NON_NEGATIVE, POSITIVE, SEED, UNIT, check, configure, declare
from dataset import check_bins, open_split, read_dataset
from errors import die
from hardware import autocast, gpu_peak, pick_device, pick_dtype
from harness import task_manager, task_scores
from lora import LORA_SETTINGS, adapters, attach, summary
from lora import check as lora_problem
from model import GPT, MODEL_FIELDS, config_from_preset
from optimizers import lr_factor, make_optimizers
from parallel import full, memory_held, shard, torchrun_env
from runlog import RunLog, StopSignals, lock_out_dir
from training import Batches, Trainer, evaluate, mean_over_ranks, split_batch
from warmstart import load_weights, vocab_fits, warm_start

# -----------------------------------------------------------------------------
# I/O
out_dir = "out"  # checkpoints, metrics.csv, run_meta.json and the tokenizer go here
eval_interval = 2000  # evaluate (and save) every this many iterations
log_interval = 1  # print a log line every this many iterations
eval_iters = 200  # batches per split in each evaluation
eval_only = False  # evaluate once and exit
eval_tasks = ""  # lm-evaluation-harness tasks scored at every evaluation on rank 0, e.g. arc_easy (needs lm-eval)
eval_tasks_limit = 100  # items of each task scored at those evaluations
eval_tasks_path = ""  # a folder of local task YAMLs for eval_tasks
# scratch | resume (out_dir/ckpt.pt) | auto (resume if there is one) | a warm start: gpt2 | gpt2-medium | gpt2-large |
# gpt2-xl | hf:FOLDER | a run folder or ckpt.pt (ours or nanoGPT's)
init_from = "scratch"
strict_init = True  # warm start: False loads the weights that fit and reports missing/unexpected keys
overwrite = False  # let init_from=scratch replace a checkpoint already in out_dir
parallel = "ddp"  # under torchrun: ddp (a full copy per process) | fsdp (parameters, gradients, optimizer sharded)
save_strategy = "latest"  # latest (ckpt.pt at every eval) | best (best.pt on a new best val loss) | both | none
save_optimizer = True  # False: checkpoints without the optimizer state (a LoRA run: a third the size; no exact resume)
early_stopping_patience = 0  # stop after this many evals without a new best val loss; 0 = never
# data
dataset = "pydocs_gpt2"  # a folder under data/ made by prepare_char.py or prepare_bpe.py
batch_size = 12  # sequences per micro-batch (per process)
block_size = 1024  # context length
gradient_accumulation_steps = 40  # micro-batches per optimizer step over all processes: 40*12*1024 = 491,520 tokens
# tokens per optimizer step over all processes (0: gradient_accumulation_steps*batch_size*block_size)
total_batch_size = 0
# model: model_type picks a preset (model.py PRESETS); any field set here overrides it
# gpt (GPT-2 block) | gpt_plus (RoPE, RMSNorm, SwiGLU) | gpt_fast (RoPE, LayerNorm, ReLU², no biases)
model_type = "gpt"
n_layer = 12  # transformer blocks
n_head = 12  # attention heads
n_embd = 768  # model width
dropout = 0.0  # 0 for pretraining; try 0.1-0.2 when finetuning or on tiny data
n_kv_head = None  # key/value heads for grouped-query attention (None: the preset's, i.e. n_head)
bias = None  # biases in Linear and LayerNorm layers (None: the preset's)
tie_weights = None  # share wte and lm_head (None: the preset's)
pos_emb = None  # learned | rope (None: the preset's)
rope_theta = None  # RoPE base (None: 10000)
norm = None  # layernorm | rmsnorm (None: the preset's)
norm_affine = None  # learnable norm scale (None: the preset's)
norm_eps = None  # norm epsilon (None: torch's default)
mlp = None  # gelu | gelu_tanh | swiglu | geglu_tanh | relu2 (None: the preset's)
mlp_hidden = None  # MLP hidden width (None: 4*n_embd, or 8/3*n_embd for swiglu)
qk_norm = None  # RMS-normalise q and k (None: the preset's)
logit_softcap = None  # cap * tanh(logits / cap) (None: off)
attn_impl = None  # sdpa | manual (None: sdpa)
window = None  # sliding-window attention: each query sees the last `window` tokens (None: off, full attention)
window_pattern = None  # with window, per layer repeated: S = windowed, L = full, e.g. SSSL (None: S, every layer)
grad_checkpoint = None  # recompute activations in backward to save memory (None: off)
init_std = None  # weight init std (None: 0.02)
ngram_emb = None  # n >= 2: add hashed embeddings of the 2..n-grams ending at each token to the input (None: off)
ngram_rows = None  # rows of each n-gram table (None: 8191)
# optimizer
optimizer = "adamw"  # adamw | muon (Muon on the 2-D matrices in the blocks, AdamW on the rest)
learning_rate = 6e-4  # peak AdamW learning rate
weight_decay = 0.1  # AdamW weight decay, on parameters with >= 2 dimensions only
beta1 = 0.9  # AdamW beta1
beta2 = 0.95  # AdamW beta2
eps = 1e-8  # AdamW epsilon
muon_lr = 0.02  # peak Muon learning rate
muon_momentum = 0.95  # Muon momentum (Nesterov)
muon_weight_decay = 0.0  # Muon decoupled weight decay
muon_ns_steps = 5  # Newton-Schulz iterations per Muon step
grad_clip = 1.0  # clip the gradient norm to this; 0 = off
label_smoothing = 0.0  # cross-entropy label smoothing
# an exponential moving average of the weights, updated after every step (ema = decay*ema + (1-decay)*weights),
# evaluated (val_loss_ema) and saved beside them for sample.py --ema=True; e.g. 0.999, 0 = off
ema_decay = 0.0
# schedule
max_iters = 600000  # total optimizer steps (also after a resume)
max_time = 0.0  # if > 0: seconds of training; the LR schedule runs on the elapsed fraction of it
decay_lr = True  # False: constant LR after warmup
lr_schedule = "cosine"  # cosine (to min_lr) | wsd (warmup, stable, linear warmdown to min_lr)
warmup_iters = 2000  # linear warmup steps
lr_decay_iters = 0  # the schedule ends here (0 = max_iters)
min_lr = 6e-5  # the AdamW LR at the end of the schedule (Muon's ends at the same fraction)
warmdown_frac = 0.2  # wsd: share of the run spent decaying
# system
device = ""  # cpu | cuda | cuda:N | mps; '' picks cuda > mps > cpu
# the precision the model computes in: float32 | bfloat16 | float16 (autocast: the weights and optimizer state stay
# float32) | auto: bfloat16 on GPUs that have it, and on CPUs with bf16 units for models and micro-batches large
# enough that it measured faster (hardware.py); float32 otherwise (kept on resume)
dtype = "auto"
compile = False  # torch.compile the model (faster steps, slower start)
auto_microbatch = False  # on out-of-memory (CUDA), halve batch_size and double the micro-steps, then go on
peak_flops = 0.0  # the device's peak FLOP/s for MFU; 0 = look the GPU up in PEAK_FLOPS
wandb_log = False  # log to Weights & Biases (needs `pip install wandb`)
wandb_project = "yoctogpt"  # wandb project
wandb_run_name = ""  # wandb run name ('' = wandb's)
seed = 1337  # seeds the weights, dropout and the batch stream
lora_rules = declare(globals(), LORA_SETTINGS)  # LoRA (lora.py): --lora_rank=8 trains adapters on a frozen base
# -----------------------------------------------------------------------------
config, explicit = configure(globals())
ddp, rank, local_rank, world_size = torchrun_env()  # torchrun sets RANK, LOCAL_RANK and WORLD_SIZE
if rank == 0 and (busy := lock_out_dir(out_dir, probe=True)[1]):
    die(busy)  # another run holds out_dir: stop before reading or writing anything there
signals = StopSignals()  # Ctrl-C and SIGTERM: at once before training starts; after the current step once it has

# where the model comes from: a resume continues the run as it was (every setting not given now comes from the
# checkpoint); a warm start takes the source's architecture and context, unless set here
ckpt_path = resolve_checkpoint(out_dir)  # ckpt.pt, or the sharded ckpt/ folder of parallel=fsdp
if init_from == "auto":
    init_from = "resume" if os.path.exists(ckpt_path) else "scratch"
record = None if init_from == "scratch" else load_source(ckpt_path if init_from == "resume" else init_from,
                                                        weights=init_from != "resume", merge=init_from != "resume")
if init_from == "resume":
    config = resumed_config(record, config, explicit)
    globals().update(config)
elif record is not None and "block_size" not in explicit:
    block_size = config["block_size"] = record.model_config["block_size"]

# checks that need no data or model: every rule on the settings, here in one place
choices = dict(optimizer=("adamw", "muon"), lr_schedule=("cosine", "wsd"),
               save_strategy=("latest", "best", "both", "none"), parallel=("ddp", "fsdp"))
for key, allowed in choices.items():
    if config[key] not in allowed:
        die(f"--{key}={config[key]!r} is not one of {', '.join(allowed)}")
check(config, dict.fromkeys(["batch_size", "block_size", "gradient_accumulation_steps", "eval_interval", "log_interval",
                             "eval_iters", "max_iters", "muon_ns_steps"], POSITIVE)
      | dict.fromkeys(["total_batch_size", "warmup_iters", "lr_decay_iters", "max_time", "learning_rate", "min_lr",
                       "muon_lr", "weight_decay", "muon_weight_decay", "grad_clip", "early_stopping_patience",
                       "peak_flops"], NON_NEGATIVE)
      | dict.fromkeys(["beta1", "beta2", "muon_momentum", "label_smoothing", "ema_decay"], FRACTION)
      | dict(eps=ABOVE_ZERO, warmdown_frac=UNIT, seed=SEED, eval_tasks_limit=POSITIVE) | lora_rules)
if not save_optimizer and parallel == "fsdp":
    die("--save_optimizer=False writes whole checkpoints; --parallel=fsdp's sharded ones keep the optimizer: drop one")
tasks = [t.strip() for t in eval_tasks.split(",") if t.strip()]
if tasks:
    task_manager(tasks, eval_tasks_path)  # the harness is installed and knows every task
if init_from != "resume" and os.path.exists(ckpt_path) and not overwrite:
    die(f"{ckpt_path} already exists; continue it with --init_from=resume, pick another --out_dir, "
        f"or pass --overwrite=True to replace it")

# distributed setup (torchrun's processes)
if ddp:
    if torch.cuda.is_available() and device in ("", "auto") or device.startswith("cuda"):
        device = f"cuda:{local_rank}"
        torch.cuda.set_device(device)
    dist.init_process_group(backend="nccl" if device.startswith("cuda") else "gloo")
master = rank == 0  # only rank 0 prints and writes files
device = pick_device(device)
device_type = device.split(":")[0]
pick_dtype(dtype, device)  # a bad --dtype stops here; auto is decided with the model's shape
fsdp = ddp and parallel == "fsdp"  # shard parameters, gradients and optimizer state over the processes
sharded_saves = parallel == "fsdp"  # checkpoints as DCP folders (one process too: any world size resumes them)
torch.manual_seed(seed)  # the same weights on every rank
torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True  # (CUDA only)

# data: token ids in memory-mapped bins, the tokenizer described by meta.json (checkpoints carry it)
dataset = config["dataset"] = dataset.removeprefix("data/")  # --dataset=data/x means x
data_dir = os.path.join("data", dataset)
meta, tokenizer = read_dataset(data_dir)
grown = vocab_fits(record and record.meta, meta, init_from, dataset)  # True: the dataset adds tokens
if config["lora_rank"] and (problem := lora_problem(config, grown)):
    die(problem)
splits = {split: open_split(data_dir, meta, split) for split in ("train", "val")}

# batch arithmetic: the tokens per optimizer step are fixed (total_batch_size, or gradient_accumulation_steps
# micro-batches of batch_size x block_size), however many processes share them: each takes its share in
# micro-batches of at most batch_size, so a config runs unchanged on 1, 2 or 8 processes
try:
    tokens = total_batch_size or gradient_accumulation_steps * batch_size * block_size
    micro_batch, accum_steps = split_batch(tokens, batch_size, block_size, world_size)
except ValueError as e:
    die(str(e))
tokens_per_iter = micro_batch * block_size * world_size * accum_steps
check_bins(data_dir, meta, block_size)
writes = master and not eval_only  # rank 0 writes; --eval_only writes nothing
log = RunLog(out_dir, master, writes, ddp)
log.take_lock()  # one run per out_dir, until the process ends

# the model: from scratch, resumed (weights here, optimizer state below), or warm-started from another's weights
iter_num, best_val_loss, train_time = 0, float("inf"), 0.0
build_on = device if not fsdp else "cpu" if record and record.model is not None else "meta"  # fsdp: see shard()
if init_from == "resume":
    model = build_model(record, build_on, dropout=dropout)
    iter_num, best_val_loss, train_time = (record.state[k] for k in ("iter_num", "best_val_loss", "train_time"))
else:
    try:
        if record is None:
            model_config = config_from_preset(model_type, **{k: config[k] for k in MODEL_FIELDS if k in config},
                                              vocab_size=meta["vocab_size"])
        else:  # the source's fields, but those set here (and dropout) win; a shorter block_size is the training
            # window only: the model keeps the source's context (a longer one grows RoPE's, never learned positions)
            overrides = {k: config[k] for k in explicit & (set(MODEL_FIELDS) | {"model_type"})}
            overrides["block_size"] = max(block_size, record.model_config["block_size"])
            grow = dict(vocab_size=meta["vocab_size"]) if grown else {}
            model_config, weights = warm_start(record, {**overrides, "dropout": dropout, **grow})
    except ValueError as e:
        die(str(e))
    if model_config.vocab_size < meta["vocab_size"]:
        die(f"--init_from={init_from} has {model_config.vocab_size} token embeddings, fewer than data/{dataset}'s "
            f"{meta['vocab_size']} tokens; prepare the data with the tokenizer it was trained with")
    with torch.device(build_on if record is None else "meta"):  # a warm start: the model takes the source's tensors
        model = GPT(model_config)
    if record is not None:
        log.print(load_weights(model, weights, strict_init, init_from, build_on))
        del weights
n_params, flops_per_token = model.num_params(), model.flops_per_token(block_size)  # (the whole model's, with LoRA)
lora_info = None
if config["lora_rank"]:  # the base frozen, adapters on its matrices (a resume puts its adapters back)
    lora_info = {k: v for k, v in record.lora.items() if k != "adapters"} if init_from == "resume" else \
        summary(config, record.model)
    record.model = None  # the model holds the base's weights alone: attach frees each float32 matrix as it goes
    log.print(f"LoRA: {attach(model, config):,} trainable parameters (rank {config['lora_rank']} on "
              f"{config['lora_targets']}), the base's {n_params:,} frozen in {config['lora_base'] or 'float32'}")
    if init_from == "resume":
        model.load_state_dict(record.lora["adapters"], strict=False)
why = f" (auto: {model.config.n_embd} wide, {micro_batch * block_size:,} tokens per micro-step)" * (dtype == "auto")
dtype = config["dtype"] = pick_dtype(dtype, device, model.config.n_embd, micro_batch * block_size)
ctx = autocast(device, dtype) if not fsdp else nullcontext()  # fsdp: its MixedPrecisionPolicy instead
ema = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(ema_decay)) if ema_decay else None  # copied, then sharded
model, _ = (shard(model, dtype, device), ema and shard(ema.module, dtype, device, True)) if fsdp else (model, None)
raw_model = model  # the module that is saved, evaluated and counted (FSDP2 shards it in place)
torch.manual_seed(seed + rank)  # each rank its own dropout, the same however the model was built
model_config = raw_model.config

# optimizers: AdamW for everything, or Muon for the 2-D matrices inside the blocks and AdamW for the rest
optimizers, muon_names, adam_names = make_optimizers(raw_model, config, fused=device_type == "cuda")
scaler = torch.amp.GradScaler(device_type, enabled=dtype == "float16")  # a no-op unless float16
if init_from == "resume":
    restore_training(record, raw_model, optimizers, scaler, ema, rank, device_type, optimizer)
    if not (record.shards or record.state["optimizers"]):
        log.print(f"{record.path} holds no optimizer state (save_optimizer=False): the moments start again from zero")
del record  # free the memory

if compile:
    log.print("compiling the model (the first steps are slow)...")
    for block in raw_model.transformer.h if fsdp else []:  # fsdp: block by block (as torchtitan), gathers between
        block.compile()
    model = model if fsdp else torch.compile(model)
eval_model = model  # compiled, but not wrapped in DDP
if ddp and not fsdp:
    model = DDP(model, device_ids=[local_rank] if device_type == "cuda" else None)


batches = Batches(splits, block_size, seed, device)
trainer = Trainer(model, raw_model, optimizers, scaler, ctx, batches, micro_batch, accum_steps, rank, label_smoothing,
                  grad_clip, auto_microbatch, log.print, ema)
token_bytes = torch.tensor(tokenizer.token_bytes(), dtype=torch.float64, device=device)  # UTF-8 bytes per token id


def evaluation(model_, names=("train", "val")):
    """evaluate() on this run's batches; None when a signal comes during it (one process)."""
    return evaluate(model_, batches, trainer.batch_size, names, eval_iters, ctx, token_bytes, rank, world_size,
                    stopped=lambda: bool(signals.received) and not ddp)


def training_state():
    """The checkpoint: weights, optimizer, RNG and EMA states and counters (weights and optimizer and EMA states in
    DCP shards with sharded_saves: `shards` lists them); every rank joins the RNG gather."""
    if save_strategy == "none" or eval_only:
        return None
    whole = not sharded_saves
    weights = adapters(raw_model) if lora_info else raw_model.state_dict()
    return dict(model=weights if whole else None, ema=ema.state_dict() if ema and whole else None, lora=lora_info,
                shards=() if whole else ("model", "optimizers") + ("ema",) * bool(ema),
                model_config=vars(model_config), config=config, scaler=scaler.state_dict(),
                optimizers=[opt.state_dict() for opt in optimizers] if whole and save_optimizer else None,
                iter_num=iter_num, best_val_loss=best_val_loss, train_time=train_time,
                rng=rng_states(ddp, world_size, device_type), meta=meta,
                sampler=dict(seed=seed, note="batches are a function of (seed, iter_num); nothing else to save"))


def save(name):
    """Every rank calls it: checkpoint `name` (ckpt or best) as name.pt, or as a sharded folder. False when nothing
    is saved (save_strategy=none, eval_only)."""
    state = training_state()
    if state is not None and sharded_saves:
        save_sharded(os.path.join(out_dir, name), raw_model, optimizers, ema, state, writes)
    elif state is not None and writes:
        save_checkpoint(state, os.path.join(out_dir, name + ".pt"))
    return state is not None


# outputs: meta.json, run_meta.json, metrics.csv (rows after a resumed checkpoint are dropped), wandb
gpu_name, peak = gpu_peak(device)
peak = (peak_flops or peak) * world_size  # all processes together
sync = torch.cuda.synchronize if device_type == "cuda" else (lambda: None)  # honest step times on a GPU
log.start(iter_num, meta, dict(config=config, model_config=vars(model_config), parameters=n_params, device=device,
                               gpu=gpu_name, dtype=dtype, world_size=world_size, torch=torch.__version__, argv=sys.argv,
                               optimizer_params=dict(muon=muon_names, adamw=adam_names)),
          ["iter", "loss", "train_loss", "val_loss", "val_bpb", "val_loss_ema", "lr", "ms_per_iter", "tok_per_s",
           "grad_norm", "gflops", "mfu", "train_s", *tasks],
          (wandb_project, wandb_run_name or f"{model_type} {model_config.describe()}",
           dict(config, model_config=vars(model_config))) if wandb_log else None)
log.print(f"{model_type}: {model_config.describe()}")
log.print(f"{n_params / 1e6:.2f}M parameters | {device} {dtype}{why} | {world_size} process(es) x {accum_steps} "
          f"micro-steps x {micro_batch} x {block_size} = {tokens_per_iter:,} tokens per step"
          + (f" (the model's context: {model_config.block_size})" if model_config.block_size != block_size else ""))


# compile before the clock starts, so max_time and ms/iter count training only: one forward/backward whose
# gradients are dropped, with the RNG (dropout) restored as if it had not run. auto_microbatch settles its
# micro-batch here too, before the first evaluation draws batches of that size
if (compile or auto_microbatch) and iter_num < max_iters and not eval_only:
    t_compile = time.time()
    with torch.random.fork_rng(devices=[device] if device_type == "cuda" else []):
        try:
            trainer.gradients(iter_num)
        except Exception as e:  # inductor needs a working C++ compiler on CPU, Triton on CUDA
            first_line = (str(e).strip().splitlines() or [""])[0][:300]
            die(f"torch.compile failed ({type(e).__name__}: {first_line}); run with --compile=False")
    trainer.zero_grads()
    if compile:
        log.print(f"compiled the training step in {time.time() - t_compile:.1f} s (start-up, outside max_time)")


signals.training = True  # from here a signal stops the loop after its step instead of the script at once
start_iter, evals_since_best, t0 = iter_num, 0, time.time()
bar = tqdm(total=max_time or max_iters, initial=train_time if max_time else iter_num, unit="s" if max_time else "it",
           dynamic_ncols=True, disable=not (master and sys.stdout.isatty()))  # seconds when the budget is time
while True:
    last_step = iter_num >= max_iters or (max_time > 0 and mean_over_ranks(train_time, device) >= max_time)

    # evaluate, log and save
    if (iter_num % eval_interval == 0 and iter_num != start_iter) or last_step or iter_num == 0 or eval_only:
        losses = evaluation(eval_model)
        ema_losses = evaluation(ema.module, ("val",)) if ema and losses else {"val": None}
        if losses is None or ema_losses is None:
            break  # a signal during the evaluation: stop now, this step is saved below
        losses["val_ema"] = ema_losses["val"]
        scores = (task_scores(eval_model, tokenizer, tasks, eval_tasks_limit, eval_tasks_path)
                  if tasks and master else {})
        log.print(f"step {iter_num} ({train_time:.1f} s): train loss {losses['train']:.4f}, "
                  f"val loss {losses['val']:.4f}, val bpb {losses['val_bpb']:.4f}"
                  + (f", val loss ema {losses['val_ema']:.4f}" if ema else "")
                  + "".join(f", {task} {value:.4f}" for task, value in scores.items()))
        if iter_num > start_iter or iter_num == 0:  # not again for the step a resume starts from
            log.record(iter=iter_num, train_loss=losses["train"], val_loss=losses["val"], val_bpb=losses["val_bpb"],
                       val_loss_ema=losses["val_ema"], train_s=train_time, **scores)
        improved = losses["val"] < best_val_loss
        best_val_loss, evals_since_best = (losses["val"], 0) if improved else (best_val_loss, evals_since_best + 1)
        if iter_num > start_iter and save_strategy in ("latest", "both"):
            save("ckpt")
        if iter_num > start_iter and improved and save_strategy in ("best", "both"):
            save("best")
        if early_stopping_patience and evals_since_best >= early_stopping_patience:
            last_step = True
            log.print(f"early stop: no new best val loss in {early_stopping_patience} evals")
    if last_step or eval_only:
        break

    # forward, backward, update
    t_step = time.time()
    lr_mult = lr_factor(iter_num, train_time, config)
    loss, grad_norm = trainer.step(iter_num, lr_mult)  # (and the EMA of the weights moves on)
    iter_num += 1
    sync()
    step_time = time.time() - t_step
    train_time += step_time
    bar.update(step_time if max_time else 1)

    # log
    if iter_num % log_interval == 0:
        loss_value = mean_over_ranks(loss.item(), device)  # the mean over micro-steps and ranks
        tok_per_s = tokens_per_iter / step_time
        flops = flops_per_token * tok_per_s * world_size  # achieved by all processes together
        speed = f"MFU {flops / peak:.1%}" if peak else f"{flops / 1e9:,.1f} GFLOP/s"
        log.print(f"iter {iter_num}: loss {loss_value:.4f}, lr {lr_mult * learning_rate:.2e}, "
                  f"{step_time * 1000:.1f} ms/iter, {tok_per_s:,.0f} tok/s, {speed}")  # above the bar on a terminal
        bar.set_postfix_str(f"loss {loss_value:.4f}, {tok_per_s:,.0f} tok/s, {speed}")
        log.record(iter=iter_num, loss=loss_value, lr=lr_mult * learning_rate, ms_per_iter=step_time * 1000,
                   tok_per_s=tok_per_s, grad_norm=float(full(grad_norm)), gflops=flops / 1e9,
                   mfu=flops / peak if peak else None, train_s=train_time)
    if signals.agreed(device):  # a signal to any rank stops every rank after this same step
        break

bar.close()
stop_signal = signals.agreed(device)
if stop_signal:  # Ctrl-C or SIGTERM: save this step (a second signal only sets the flag again), then exit 130 / 143
    saved = (f"resume with --init_from=resume --out_dir={out_dir}" if save("ckpt") else
             f"nothing saved ({'eval_only' if eval_only else 'save_strategy=none'})")
    log.print(f"stopped at iter {iter_num} by {signal.Signals(stop_signal).name}; {saved}", file=sys.stderr)
else:
    memory = (f", peak GPU memory {torch.cuda.max_memory_allocated(device) / 2**30:.1f} GiB"
              if device_type == "cuda" else "")
    log.print(f"done: {iter_num} iterations, best val loss {best_val_loss:.4f}, {train_time:.1f} s of training, "
              f"{time.time() - t0:.1f} s in all{memory}, {memory_held(raw_model, optimizers)}")
log.close()
if ddp:
    dist.destroy_process_group()
if stop_signal:
    for sig in (signal.SIGINT, signal.SIGTERM):  # ignored from here: one more during the exit must not kill it
        signal.signal(sig, signal.SIG_IGN)
    sys.exit(128 + stop_signal)
