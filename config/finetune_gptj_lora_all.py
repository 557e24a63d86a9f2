# GPT-J-6B as a moderation classifier (hate / offensive / neutral) on one 11 GB card: the frozen base in
# int8 (LLM.int8, ~5.6 GB of block matmuls), LoRA rank 8 on every block matmul, 8-bit AdamW,
# activation checkpointing, the loss on the completion only (its label and <|endoftext|>).
#   python data/hate_speech/prepare.py            # 1,000 train / 200 class-balanced val (data/hate_speech)
#   python train.py config/finetune_gptj_lora_all.py
#   python eval.py --out_dir=out-gptj-lora-all --tasks=generate --data_file=data/hate_speech/val.jsonl --max_new_tokens=4
# Way 3 of 4 (docs/gptj.md has each one's counts): way 1 is finetune_gptj_1d.py, way 4 finetune_gptj_fewshot.py,
# and way 2, LoRA on the attention matmuls only (c_attn, attn.c_proj), is this file with two overrides:
#   python train.py config/finetune_gptj_lora_all.py --lora_targets=attn --out_dir=out-gptj-lora-attn
# which trains 5,505,024 LoRA parameters (rank 8 x (4096+12288 + 4096+4096) x 28 blocks), 0.09%.
# Needs the real weights: init_from downloads EleutherAI/gpt-j-6b into the Hugging Face cache (in float32
# the model is 24 GB); they are read tensor by tensor, each block matmul quantised as it arrives, so host
# memory peaks near the int8 model (~7.3 GB with the float32 embeddings and lm_head). A local
# save_pretrained directory works as well.
# Trained: 14,680,064 LoRA parameters (rank 8 x (4096+12288 + 4096+4096 + 4096+16384 + 16384+4096) x 28
# blocks), 0.24% of GPT-J-6B's 6,050,882,784. Memory at batch 4 x 128 with fp16 autocast: see
# `python benchmarks/gptj_memory.py --estimate_only --lora_targets=all --batch_size=4 --block_size=128`.
# 4 batch x 4 accum = 16 examples/step; 1,000 / 16 = 62.5 steps per epoch; 250 steps = 4 epochs.
# A tweet prompt is ~20 format tokens + the tweet (<= 280 characters, mostly under 80 tokens): 128 fits.
out_dir = "out-gptj-lora-all"
eval_interval = 25
eval_iters = 0  # the whole 200-example validation set
log_interval = 5
always_save_checkpoint = False

init_from = "EleutherAI/gpt-j-6b"
sft_train_file = "data/hate_speech/train.jsonl"
sft_val_file = "data/hate_speech/val.jsonl"
batch_size = 4
gradient_accumulation_steps = 4
block_size = 128

base_quant = "int8"
lora_rank = 8
lora_alpha = 16.0
lora_dropout = 0.05
lora_targets = "all"
optimizer = "adamw8bit"
activation_checkpointing = True

learning_rate = 2e-4  # as the LoRA paper's GPT-2 and GPT-3 runs (1e-4 to 2e-4)
weight_decay = 0.01
max_iters = 250
lr_decay_iters = 250
min_lr = 2e-5
warmup_iters = 20
dropout = 0.0
