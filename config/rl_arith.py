# The RL recipe's second stage: GRPO on the built-in sums from the SFT model of config/sft_arith.py. Each step samples
# 8 answers to each of 16 prompts, rewards the right sums (the answer's last number), and moves toward the answers
# that beat their group; held-out pass@1 (greedy, 128 sums never trained on) every 100 steps. ~10 min on 2 cores:
#   python prepare_char.py --input=arithmetic && python train.py config/sft_arith.py
#   python rl.py config/rl_arith.py
init_from = "out-sft-arith"
out_dir = "out-rl-arith"
task = "arithmetic"
eval_prompts = 128
eval_interval = 100
num_samples = 8
prompts_per_step = 16
max_new_tokens = 16  # "12 + 34 = 46" and its end of turn
temperature = 1.0
max_iters = 600
# AdamW at a constant 1e-4 (pass@1 0.33 -> 0.71, median of 3 seeds): 1e-3 collapsed the answers within 50 steps,
# 3e-4 lost ground before it gained
learning_rate = 1e-4
min_lr = 1e-4
