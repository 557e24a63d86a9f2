# GPT-J-6B on GLUE MNLI as text-to-text (T5's format): "mnli hypothesis: {h} premise: {p} target: {label}",
# examples packed back to back into 256-token windows (no padding, no mask between them), the loss on
# the whole packed text; int8 base + LoRA on every block matmul + 8-bit AdamW, as the classifier recipe.
#   python data/mnli/prepare.py                      # -> data/mnli/{train,val}.bin, validation_matched.jsonl
#   python train.py config/finetune_gptj_mnli.py
#   python eval.py --out_dir=out-gptj-mnli --tasks=generate --data_file=data/mnli/validation_matched.jsonl --max_new_tokens=3
#   python export_hf.py --out_dir=out-gptj-mnli --hf_dir=hf-gptj-mnli --dtype=float16
# Accuracy: greedy generation of at most 3 tokens per validation_matched pair, overall and per class
# (eval.py's generate task). val.bin (validation_matched, packed the same way) gives the val loss.
# 4 batch x 8 accum x 256 tokens = 8,192 tokens/step. MNLI's 392,702 training pairs are ~45 GPT-2
# tokens each with their <|endoftext|>, ~17.7M tokens: 2,000 steps = 16.4M tokens, ~0.9 epoch.
# Needs the real weights (see finetune_gptj_lora_all.py); the export dequantises the int8 base and
# merges the adapters into a float model (float16: 12 GB on disk).
out_dir = "out-gptj-mnli"
eval_interval = 250
eval_iters = 50  # 50 x 4 windows x 256 = 51,200 of validation_matched's tokens
log_interval = 10
always_save_checkpoint = False

init_from = "EleutherAI/gpt-j-6b"
dataset = "mnli"
sampling = "sequential"  # every packed window once per epoch
batch_size = 4
gradient_accumulation_steps = 8
block_size = 256

base_quant = "int8"
lora_rank = 8
lora_alpha = 16.0
lora_dropout = 0.05
lora_targets = "all"
optimizer = "adamw8bit"
activation_checkpointing = True

learning_rate = 2e-4
weight_decay = 0.01
max_iters = 2000
lr_decay_iters = 2000
min_lr = 2e-5
warmup_iters = 100
dropout = 0.0
