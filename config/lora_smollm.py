# Fine-tune SmolLM2-135M-Instruct with LoRA on your own conversations: adapters of rank 16 on every attention and MLP
# matrix train (4.1M weights, 3.0% of the model), the base stays frozen, and the run folder holds the adapters only.
#   pip install huggingface_hub safetensors jinja2
#   python prepare_bpe.py --input=pydocs_chat --tokenizer=hf:HuggingFaceTB/SmolLM2-135M-Instruct
#   python train.py config/lora_smollm.py
#   python chat.py --out_dir=out-lora-smollm
#   python convert.py --out_dir=out-lora-smollm --to=hf --dest=hf-lora-smollm    # merged: a plain model
#   python convert.py --out_dir=out-lora-smollm --to=peft --dest=peft-smollm     # the adapters, for peft
# --lora_base=int8 --grad_checkpoint=True: the least memory (1.1 GiB, not 1.6; BENCHMARKS.md) at ~1.5x the time a step.
init_from = "hf:HuggingFaceTB/SmolLM2-135M-Instruct"
out_dir = "out-lora-smollm"
dataset = "pydocs_chat_bpe"
block_size = 256  # chats are short; a step of 256-token windows is cheap, and the model keeps its own context
batch_size = 1  # micro-steps of one window: the activations of 256 tokens, not 1,024 (peak ~1.7 GiB)
gradient_accumulation_steps = 8  # 8 * 1 * 256 = 2,048 tokens per step, as config/finetune_smollm.py
max_iters = 100
eval_interval = 25
eval_iters = 10
save_strategy = "best"  # keep the adapters of the best val loss
save_optimizer = False  # best.pt: the adapters, no AdamW state (the folder 23 MB, 4% of the base); True keeps the
# moments (+35 MB) for an exact --init_from=resume
lora_rank = 16
lora_alpha = 32.0  # the update scaled by alpha / rank = 2 (the usual alpha = 2 * rank)
lora_dropout = 0.0
lora_targets = "attn,mlp"
# the best of a sweep over 3e-4, 1e-3, 3e-3, 1e-2 (BENCHMARKS.md): ~30x full fine-tuning's best (3e-4), as B
# starts at zero (2e-2 diverges); after 20 steps its val loss is ~4% above full fine-tuning's (median of 3 seeds)
optimizer = "adamw"
learning_rate = 1e-2
min_lr = 1e-3
warmup_iters = 10
weight_decay = 0.0
dropout = 0.0
