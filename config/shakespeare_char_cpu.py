# The fastest CPU recipe we found for character-level tiny Shakespeare (see README Benchmarks: ablations).
#   python prepare_char.py --input=shakespeare && python train.py config/shakespeare_char_cpu.py
#   python train.py config/shakespeare_char_cpu.py --max_time=45
out_dir = "out-shakespeare-char-cpu"
dataset = "shakespeare_char"
device = "cpu"
max_time = 12.0  # seconds of training; the LR schedule runs on the elapsed fraction of it
max_iters = 1_000_000  # the time budget ends the run
eval_interval = 250  # a point of the curve every 250 steps (evaluations are outside max_time: wall time only)
eval_iters = 200
log_interval = 25
# one layer, fed the 2- and 3-grams ending at each character (ngram_emb): the tables give the local
# context a first layer would spend its steps on, so a single, fast layer attends over 128 characters.
# 24 batch * 128 block = 3,072 tokens per step
batch_size = 24
block_size = 128
gradient_accumulation_steps = 1
n_layer = 1
n_head = 2
n_embd = 96
ngram_emb = 3  # + embeddings of (previous, this) and (two back, previous, this) characters, 8191 rows each
dropout = 0.0
model_type = "gpt_fast"  # RoPE is most of the gain over the GPT-2 block; ReLU² and LayerNorm keep it fast
optimizer = "muon"  # Muon on the block matrices, AdamW on the embeddings (n-gram tables too) and norms
muon_lr = 0.04
muon_momentum = 0.9
learning_rate = 1e-2  # AdamW's part: embeddings and the tied head take a high LR at this size
min_lr = 1e-4
beta2 = 0.99
warmup_iters = 10
compile = True  # inductor fuses the elementwise ops: ~20% faster steps; compiled before max_time's clock starts
lr_schedule = "wsd"  # flat, then linear to min_lr over the last half of the budget
warmdown_frac = 0.5
