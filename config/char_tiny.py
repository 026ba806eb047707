# The quick start: a small character model of Python's reference docs, trained in minutes on a CPU
# (its val loss and time on a named CPU: BENCHMARKS.md, "char_tiny").
#   python prepare_char.py && python train.py config/char_tiny.py && python sample.py --out_dir=out-char-tiny
out_dir = "out-char-tiny"
dataset = "pydocs_char"
eval_interval = 250
eval_iters = 50
log_interval = 50
# 8 batch * 256 block = 2,048 tokens per step: a 256-character context leaves chat.py room for a conversation
batch_size = 8
gradient_accumulation_steps = 1
block_size = 256
# RoPE, ReLU², no biases: a lower val loss than the GPT-2 block at this context (BENCHMARKS.md, "char_tiny")
model_type = "gpt_fast"
n_layer = 4
n_head = 4
n_embd = 128
dropout = 0.0
# Muon on the block matrices, AdamW on the rest (embeddings, norms)
optimizer = "muon"
muon_lr = 0.02
learning_rate = 2e-3
max_iters = 500
warmup_iters = 50
min_lr = 2e-4
beta2 = 0.99
