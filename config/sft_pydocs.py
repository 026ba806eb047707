# Supervised fine-tuning on conversations: questions about Python answered in its reference docs' words (the loss
# counts the assistant's tokens only). From nothing, a few minutes on a CPU:
#   python prepare_bpe.py --input=pydocs_chat && python train.py config/sft_pydocs.py
#   python chat.py --out_dir=out-sft-pydocs
# From a base model (the chat data encoded with the base's tokenizer, so the token ids are the same):
#   python prepare_bpe.py && python train.py config/bpe_small.py
#   python prepare_bpe.py --input=pydocs_chat --tokenizer=data/pydocs_bpe/tokenizer.json
#   python train.py config/sft_pydocs.py --init_from=out-bpe-small
out_dir = "out-sft-pydocs"
dataset = "pydocs_chat_bpe"  # 316 conversations (~120 K tokens) from prepare_bpe.py --input=pydocs_chat
eval_interval = 100
eval_iters = 40
log_interval = 50
# 16 conversations (packed to 256 tokens, starting at a conversation's start) per step
batch_size = 16
gradient_accumulation_steps = 1
block_size = 256
model_type = "gpt_plus"
n_layer = 4
n_head = 4
n_embd = 128
dropout = 0.1
optimizer = "muon"
muon_lr = 0.02
learning_rate = 2e-3
max_iters = 300
warmup_iters = 50
min_lr = 2e-4
beta2 = 0.99
save_strategy = "both"  # ckpt.pt to resume, best.pt for chat (the answers overfit after a while)
