"""
What every script that runs a trained model shares (sample.py, chat.py, serve.py, eval.py): its load settings and
the model loaded from any source (checkpoint.load_source) ready to decode: on its device, in its dtype, shortened or
quantized if asked, with its tokenizer. Not run by itself.
"""

import sys
import time

from checkpoint import SOURCES, build_model, load_source, shortened
from configurator import NON_NEGATIVE
from errors import die
from hardware import DTYPE_HELP, DTYPES, pick_device, pick_dtype
from quantize import KINDS, for_decoding
from tokenizer import check_tokenizer

KV_NOTE_BYTES = 2**30  # load_for_inference notes a KV cache larger than this, per sequence
# the settings of every script that loads a trained model (sample.py, chat.py, serve.py, eval.py): (default, rule, help)
LOAD_SETTINGS = dict(
    out_dir=("out-char-tiny", None, "the training run to load (init_from=resume)"),
    ckpt=("", None, "checkpoint file in out_dir; '' = ckpt.pt, or best.pt if that is all there is"),
    init_from=("resume", None, f"resume (out_dir's checkpoint) | {SOURCES}"),
    ema=(False, None, "the run's moving average of the weights (trained with --ema_decay)"),
    block_size=(0, NON_NEGATIVE, "a shorter context than the model's, for a smaller KV cache (0 = the model's)"),
    device=("", None, "cpu | cuda | cuda:N | mps; '' picks cuda > mps > cpu"),
    dtype=("auto", None, DTYPE_HELP + "; the weights are converted to it"),
    quantize=("", (lambda v: v in KINDS, "int8, int4 or ''"),
              "int8 | int4: weight-only 8- or 4-bit matrices, faster decoding on a CPU (greedy tokens may differ)"))
LOAD_DEFAULTS = {name: default for name, (default, _, _) in LOAD_SETTINGS.items()}


def load_model(spec, device, name="", ema=False, block_size=0):
    """(model in eval mode, Source) for any source; ema=True takes a run's moving average of the weights
    (train.py --ema_decay); block_size > 0 shortens the context (and the KV cache) below the model's."""
    record = load_source(spec, name=name)
    if ema:
        if not record.ema:
            die(f"{spec} holds no EMA weights; train with --ema_decay=0.999 (say), or drop --ema")
        record.model = {k.removeprefix("module."): v for k, v in record.ema.items() if k != "n_averaged"}
    if block_size:
        record = shortened(record, block_size)
    return build_model(record, device).eval(), record


def source_of(settings):
    """The model a script's LOAD_SETTINGS name: out_dir's checkpoint for init_from=resume, else init_from."""
    return settings["out_dir"] if settings["init_from"] == "resume" else settings["init_from"]


def load_for_inference(settings, announce=None):
    """(model ready to decode, tokenizer) from a script's LOAD_SETTINGS: on its device, in its dtype (the weights
    converted), quantized if asked; the tokenizer carries the checkpoint's meta (a chat template). On stderr: what
    loads and how long it took (announce; None: on a terminal), a note when the KV cache of one sequence would take
    over KV_NOTE_BYTES."""
    device = settings["device"] = pick_device(settings["device"])
    dtype = settings["dtype"] = pick_dtype(settings["dtype"], device)
    spec, start = source_of(settings), time.time()
    if sys.stderr.isatty() if announce is None else announce:
        print(f"loading {spec} ...", file=sys.stderr, flush=True)
    model, record = load_model(spec, device, settings["ckpt"], settings["ema"], settings["block_size"])
    cfg = model.config
    cache = 2 * cfg.n_layer * cfg.n_kv_head * cfg.head_dim * cfg.block_size * DTYPES[dtype].itemsize
    if cache > KV_NOTE_BYTES:
        print(f"note: the KV cache takes {cache / 2**30:.1f} GiB per sequence at the model's block_size="
              f"{cfg.block_size}; --block_size={min(cfg.block_size // 4, 4096)} lowers it", file=sys.stderr)
    try:
        tokenizer = check_tokenizer(record.meta or {})
    except ValueError as e:
        die(f"{spec} carries no usable tokenizer ({e}); re-train with this version, or import the model with its "
            f"tokenizer (convert.py --src=FOLDER with its tokenizer.json)")
    tokenizer.meta = record.meta  # its chat template and stop ids
    if sys.stderr.isatty():
        print(f"loaded in {time.time() - start:.1f} s", file=sys.stderr)
    return for_decoding(model.to(DTYPES[dtype]), settings["quantize"]), tokenizer
