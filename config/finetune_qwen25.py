# Fine-tune Qwen2.5-0.5B-Instruct (the default model of TRL's SFT, DPO and GRPO quickstarts) on your own
# conversations, in its own ChatML template (<|im_start|>user ... <|im_end|>). ~1 GB is downloaded once.
#   pip install huggingface_hub safetensors jinja2
#   python prepare_bpe.py --input=chats.jsonl --tokenizer=hf:Qwen/Qwen2.5-0.5B-Instruct  # -> data/chats_bpe
#   python train.py config/finetune_qwen25.py
#   python chat.py --out_dir=out-qwen25
# Its architecture comes with it (model.py: a Llama with biases on q, k and v, 14 query heads sharing 2 key/value
# heads, tied embeddings); no model flag is needed. 494M weights: float32 weights, gradients and AdamW's moments are
# ~8 GB, so on a laptop CPU prefer a GPU or a Mac (--device=mps), or a smaller model (config/finetune_smollm.py).
init_from = "hf:Qwen/Qwen2.5-0.5B-Instruct"
out_dir = "out-qwen25"
dataset = "chats_bpe"
block_size = 512  # chats are short; RoPE needs no cropping, and 512 (not its 32,768) keeps a step affordable
batch_size = 2
gradient_accumulation_steps = 4  # 4 * 2 * 512 = 4,096 tokens per step
max_iters = 100
eval_interval = 25
eval_iters = 10
save_strategy = "best"  # keep the weights of the best val loss: a small chat set overfits within a few passes
# 2e-5: TRL's SFT default, which its Qwen2.5 quickstarts use (Qwen's own instruction tuning decayed from 7e-6 to 7e-7
# over a far larger set); a short warmup and a decay to 1/10; AdamW on every weight, no weight decay, no dropout
optimizer = "adamw"
learning_rate = 2e-5
min_lr = 2e-6
warmup_iters = 10
weight_decay = 0.0
dropout = 0.0
