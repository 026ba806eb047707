# Fine-tune SmolLM2-135M-Instruct (Hugging Face's small chat model: a Llama with GQA and tied embeddings) on your
# own conversations, in its own chat template. Its weights and tokenizer are downloaded once (~270 MB):
#   pip install huggingface_hub safetensors jinja2
#   python prepare_bpe.py --input=chats.jsonl --tokenizer=hf:HuggingFaceTB/SmolLM2-135M-Instruct  # -> data/chats_bpe
#   python train.py config/finetune_smollm.py
#   python chat.py --out_dir=out-smollm
# Continued pretraining on plain text works the same: prepare it with the same --tokenizer, then --dataset=NAME.
init_from = "hf:HuggingFaceTB/SmolLM2-135M-Instruct"
out_dir = "out-smollm"
dataset = "chats_bpe"
block_size = 256  # chats are short; RoPE needs no cropping, and 256 (not its 8192) keeps a step cheap on a CPU
batch_size = 4
gradient_accumulation_steps = 2  # 2 * 4 * 256 = 2,048 tokens per step
# ~23 s a step on a 2-core AMD EPYC VM in float32, peak RSS ~5.5 GB (1 x 256 x 8 micro-steps: ~28 s, 3.4 GB), so 100
# steps take ~40 minutes there, about 1.5 passes over pydocs_chat in SmolLM2's tokens; a GPU takes seconds. LoRA
# (config/lora_smollm.py) takes less memory and time and writes 23 MB, not 1.6 GB
max_iters = 100
eval_interval = 25
eval_iters = 10
save_strategy = "best"  # keep the weights of the best val loss: a small chat set overfits within a few passes
# a warm start wants smaller steps than pretraining: 1/10 of SmolLM2's peak (3e-3), the best of a 20-step sweep over
# 3e-5, 1e-4, 3e-4 (BENCHMARKS.md), a short warmup, a decay to 1/10, AdamW on every weight (Muon's orthogonalised
# steps are sized for training from scratch), no weight decay
optimizer = "adamw"
learning_rate = 3e-4
min_lr = 3e-5
warmup_iters = 20
weight_decay = 0.0
dropout = 0.0
