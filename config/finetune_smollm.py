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
# ~9 s a step on a 2-core Intel Xeon VM in float32 (this shape in bench.py --mode=step: 4.45 s per micro-step),
# so 100 steps take ~15 minutes there, about 1.5 passes over pydocs_chat in SmolLM2's tokens; a GPU takes seconds
max_iters = 100
eval_interval = 25
eval_iters = 10
save_strategy = "best"  # keep the weights of the best val loss: a small chat set overfits within a few passes
# a warm start wants small steps: ~1/100 of SmolLM2's pretraining peak (3e-3), a short warmup, a decay to 1/10,
# AdamW on every weight (Muon's orthogonalised steps are sized for training from scratch), no weight decay
optimizer = "adamw"
learning_rate = 3e-5
min_lr = 3e-6
warmup_iters = 20
weight_decay = 0.0
dropout = 0.0
