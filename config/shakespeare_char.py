# nanoGPT's GPU recipe for character-level Shakespeare (nanoGPT reaches ~1.47 val loss in ~3 min on an A100).
#   python prepare_char.py --input=shakespeare && python train.py config/shakespeare_char.py
out_dir = "out-shakespeare-char"
dataset = "shakespeare_char"
eval_interval = 250  # the model overfits on this small corpus: evaluate often, keep the best
eval_iters = 200
log_interval = 10
save_strategy = "both"
# 64 batch * 256 block * 1 accumulation step = 16,384 tokens per step
batch_size = 64
block_size = 256
gradient_accumulation_steps = 1
n_layer = 6
n_head = 6
n_embd = 384
dropout = 0.2
learning_rate = 1e-3  # small models can take a larger LR
max_iters = 5000
min_lr = 1e-4
beta2 = 0.99  # more tokens per step would allow 0.95
warmup_iters = 100
compile = True  # on CUDA; pass --compile=False on a laptop
