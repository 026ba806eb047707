# The RL recipe's first stage: a tiny character model learns to answer "What is 12 + 34?" with "12 + 34 = 46" from
# 4,500 worked sums (the loss counts the answers only); a few minutes on a CPU. Then rl.py raises its held-out pass@1:
#   python prepare_char.py --input=arithmetic && python train.py config/sft_arith.py
#   python rl.py config/rl_arith.py
out_dir = "out-sft-arith"
dataset = "arithmetic_char"  # from prepare_char.py --input=arithmetic (the sums rl.py holds out are never in it)
model_type = "gpt_plus"
n_layer = 4
n_head = 4
n_embd = 128
block_size = 64  # a conversation is ~45 characters
batch_size = 32
gradient_accumulation_steps = 1
dropout = 0.0
optimizer = "muon"
muon_lr = 0.02
learning_rate = 3e-3
max_iters = 600
warmup_iters = 50
min_lr = 3e-4
eval_interval = 100
eval_iters = 20
log_interval = 50
