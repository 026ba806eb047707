"""
Models in and out: imports OpenAI's GPT-2 (from the Hugging Face hub), Hugging Face folders of the families hf.py
maps, GGUF files and nanoGPT checkpoints into a yoctoGPT run folder; exports a run to a folder that transformers (and
vLLM) load as it is, to a GGUF file that llama.cpp, Ollama and LM Studio run (a LoRA run's adapters merged in), or a
LoRA run's adapters to a PEFT adapter folder.

    python convert.py --src=gpt2 --out_dir=out-gpt2                         # OpenAI's GPT-2 (downloaded once)
    python convert.py --src=../nanoGPT/out-shakespeare-char --out_dir=out-nano  # a nanoGPT out_dir or ckpt.pt
    python convert.py --src=hf:path/to/folder --out_dir=out-llama             # a local Hugging Face folder
    python convert.py --out_dir=out-bpe-small --to=hf --dest=hf-bpe-small       # export for transformers
    python convert.py --out_dir=out-bpe-small --to=gguf --dest=bpe-small.gguf --gguf_type=q8_0  # for llama.cpp
    python convert.py --out_dir=out-lora-smollm --to=peft --dest=lora-smollm   # a LoRA run's adapters, for peft
"""

import os

from checkpoint import load_source, resolve_checkpoint, save_checkpoint
from configurator import configure
from dataset import check_writable, make_out_dir, write_vocab
from errors import die
from gguf_file import KINDS as GGUF_KINDS
from gguf_file import write_gguf
from hf import export_hf
from lora import export_peft
from model import config_from_dict
from tokenizer import describe_vocab

# -----------------------------------------------------------------------------
src = ""  # import from: gpt2 | gpt2-medium | gpt2-large | gpt2-xl | hf:FOLDER | gguf:FILE | a nanoGPT out_dir or ckpt
out_dir = ""  # the yoctoGPT run folder: written by an import, read by an export
ckpt = ""  # export: the checkpoint in out_dir ('' = ckpt.pt, or best.pt if that is all there is)
# export format: hf (a Hugging Face folder: config.json, model.safetensors, tokenizer) | gguf (one file) | peft (a
# LoRA run's adapters as a PEFT adapter folder; hf and gguf merge them into the base)
to = "hf"
dest = ""  # export: the folder (hf, peft) or .gguf file (gguf) to write
gguf_type = "f16"  # --to=gguf: the matrices' type, f32 | f16 | bf16 | q8_0 | q4_0 (norms stay f32)
meta = ""  # import: a nanoGPT meta.pkl or a meta.json with the vocabulary, when none lies beside the checkpoint
overwrite = False  # replace an existing out_dir/ckpt.pt (import) or a non-empty dest (export)
# -----------------------------------------------------------------------------


def import_run(source):
    """Write out_dir/ckpt.pt (and meta.json, tokenizer.json) for a source, so every script takes it as a run."""
    cfg = config_from_dict(source.model_config)
    record = dict(model=source.model, model_config=vars(cfg), meta=source.meta, config=dict(out_dir=out_dir),
                  iter_num=0, best_val_loss=float("inf"), train_time=0.0, converted_from=src)
    make_out_dir(out_dir)
    save_checkpoint(record, os.path.join(out_dir, "ckpt.pt"))
    if source.meta:
        write_vocab(out_dir, source.meta)
    else:
        print("note: the source has no tokenizer; it trains (init_from) but sample.py and chat.py need one")
    print(f"wrote {out_dir}/ckpt.pt: {cfg.describe()}, {describe_vocab(source.meta)}")


if __name__ == "__main__":
    configure(globals())
    if not out_dir:
        die("--out_dir is required: the run folder to write (with --src) or to export (with --dest)")
    if src:  # every check before anything is read or written
        check_writable(out_dir)
        if os.path.isfile(os.path.join(out_dir, "ckpt.pt")) and not overwrite:
            die(f"{out_dir}/ckpt.pt already exists; pick another --out_dir or pass --overwrite=True")
        import_run(load_source(src, meta))
    elif dest:
        if to not in ("hf", "gguf", "peft") or gguf_type not in GGUF_KINDS:
            die(f"--to={to!r} --gguf_type={gguf_type!r}: the export format is hf (a Hugging Face folder), peft (a "
                f"LoRA run's adapters) or gguf (a file; --gguf_type one of {', '.join(GGUF_KINDS)})")
        check_writable(os.path.dirname(os.path.abspath(dest)) if to == "gguf" else dest, "--dest")
        taken = os.path.exists(dest) if to == "gguf" else os.path.isdir(dest) and os.listdir(dest)
        if taken and not overwrite:
            die(f"{dest} {'exists' if to == 'gguf' else 'is not empty'}; pick another --dest or pass --overwrite=True")
        source = load_source(resolve_checkpoint(out_dir, ckpt), merge=to != "peft")
        if to == "peft":
            export_peft(source, dest)
        elif to == "gguf":
            write_gguf(source, dest, gguf_type)
            print(f"wrote {dest}: {config_from_dict(source.model_config).describe()}, {gguf_type}")
        else:
            export_hf(source, dest)
    else:
        die("nothing to do: --src=SOURCE imports into --out_dir; --to=hf|gguf --dest=PATH exports --out_dir")
