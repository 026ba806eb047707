# nanoGPT's fine-tuning recipe: OpenAI's GPT-2 weights, then a few hundred steps on Shakespeare in GPT-2's tokens
# at a small constant LR, keeping the best checkpoint. The weights (~500 MB for gpt2) download once from the
# Hugging Face hub (pip install huggingface_hub safetensors); tiktoken's GPT-2 files download once too.
#   python prepare_bpe.py --input=shakespeare --tokenizer=gpt2 && python train.py config/finetune_shakespeare.py
#   python sample.py --out_dir=out-shakespeare-gpt2 --prompt="ROMEO:"
# On a GPU, nanoGPT uses --init_from=gpt2-xl (1.5B) with --batch_size=1 --gradient_accumulation_steps=32.
out_dir = "out-shakespeare-gpt2"
dataset = "shakespeare_gpt2"
init_from = "gpt2"  # the architecture, context (1024) and weights come from it; gpt2-medium/-large/-xl work too
save_strategy = "best"  # best.pt on each new best val loss: the model overfits this small corpus after a while
eval_interval = 25
eval_iters = 20
log_interval = 5
# 8 batch * 256 block * 4 accumulation steps = 8,192 tokens per step; the shorter context crops GPT-2's positions
batch_size = 8
block_size = 256
gradient_accumulation_steps = 4
dropout = 0.1
learning_rate = 3e-5  # fine-tune at a small constant LR
decay_lr = False
warmup_iters = 0
max_iters = 300
weight_decay = 0.0
