# Fine-tune Gemma 3 270M (instruction-tuned; Google pitches it for task-specific fine-tuning on device) on your own
# conversations, in its own chat template (<start_of_turn>user ... <end_of_turn>). The hub repo is gated: accept its
# terms on huggingface.co/google/gemma-3-270m-it and log in (hf auth login) once; ~540 MB are downloaded.
#   pip install huggingface_hub safetensors jinja2
#   python prepare_bpe.py --input=chats.jsonl --tokenizer=hf:google/gemma-3-270m-it  # -> data/chats_bpe
#   python train.py config/finetune_gemma3.py
#   python chat.py --out_dir=out-gemma3
# Its architecture comes with it (model.py: sliding windows of 512 in five layers of six, sandwich norms, GeGLU,
# QK-norm, embeddings scaled by sqrt(640)); no model flag is needed. 168M of its 268M weights are the 262,144-token
# embedding, tied to the head: the head's matmul is most of a step on a CPU, and float32 weights, gradients and
# AdamW's moments take ~4.3 GB.
init_from = "hf:google/gemma-3-270m-it"
out_dir = "out-gemma3"
dataset = "chats_bpe"
block_size = 256  # chats are short; RoPE needs no cropping, and 256 (not its 32,768) keeps a step cheap on a CPU
batch_size = 4
gradient_accumulation_steps = 2  # 2 * 4 * 256 = 2,048 tokens per step
max_iters = 100
eval_interval = 25
eval_iters = 10
save_strategy = "best"  # keep the weights of the best val loss: a small chat set overfits within a few passes
# the learning rate of Google's own full fine-tuning guide for this model (5e-5, AdamW), with a short warmup and a
# decay to 1/10: a warm start wants steps ~100x smaller than pretraining's; no weight decay, no dropout (Gemma has none)
optimizer = "adamw"
learning_rate = 5e-5
min_lr = 5e-6
warmup_iters = 10
weight_decay = 0.0
dropout = 0.0
