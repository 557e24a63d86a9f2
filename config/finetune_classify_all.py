# Classifier comparison, way 3 of 4: LoRA (rank 8) on every Linear of the blocks (attention and MLP).
# finetune_classify_lora.py explains the data and numbers; only the targets and out_dir differ.
#   python train.py config/finetune_classify_all.py
#   python eval.py --out_dir=out-classify-all --tasks=generate --data_file=data/classify/test.jsonl --max_new_tokens=4
# gpt2-medium: 3,145,728 trained parameters (0.88%); the MLP adapters add capacity where the
# attention-only adapter is short of it, for ~2.7x the adapter size.
out_dir = "out-classify-all"
eval_interval = 50
log_interval = 10
always_save_checkpoint = False
init_from = "gpt2-medium"
sft_train_file = "data/classify/train.jsonl"
sft_val_file = "data/classify/val.jsonl"
batch_size = 16
gradient_accumulation_steps = 2  # 32 examples/step; 700 steps ~ 1 epoch of 21,783
block_size = 128
lora_rank = 8
lora_alpha = 16.0
lora_dropout = 0.05
lora_targets = "all"
learning_rate = 3e-4
weight_decay = 0.01
max_iters = 700
lr_decay_iters = 700
min_lr = 3e-5
warmup_iters = 50
