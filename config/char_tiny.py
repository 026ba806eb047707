# The quick start: a small character model of Python's reference docs, about a minute on a 2-core CPU
# (~1.25 val loss, 1.8 bits per byte).
#   python prepare_char.py && python train.py config/char_tiny.py && python sample.py --out_dir=out-char-tiny
out_dir = "out-char-tiny"
dataset = "pydocs_char"
eval_interval = 500
eval_iters = 50
log_interval = 50
# 16 batch * 64 block * 1 accumulation step = 1,024 tokens per step
batch_size = 16
gradient_accumulation_steps = 1
block_size = 64
n_layer = 4
n_head = 4
n_embd = 128
dropout = 0.0
# Muon on the block matrices reaches ~1.25 here where AdamW alone reaches ~1.50 in the same time
optimizer = "muon"
muon_lr = 0.02
learning_rate = 2e-3
max_iters = 1000
lr_decay_iters = 1000
warmup_iters = 100
min_lr = 2e-4
beta2 = 0.99
