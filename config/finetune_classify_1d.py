# Classifier comparison, way 1 of 4: train only the 1-D parameters (biases and LayerNorm gains, as
# BitFit, Ben Zaken et al. 2021), everything else frozen. finetune_classify_lora.py explains the data
# and lists the four ways.
#   python train.py config/finetune_classify_1d.py
#   python eval.py --out_dir=out-classify-1d --tasks=generate --data_file=data/classify/test.jsonl --max_new_tokens=4
# gpt2-medium: 321,536 trained parameters (0.09%), the fewest of the three trained ways; with so few,
# a higher learning rate than LoRA's (BitFit used 1e-4 to 1e-3).
# base_dtype stays float32: the frozen bf16 weights next to trained fp32 biases need autocast (GPU).
out_dir = "out-classify-1d"
eval_interval = 50
log_interval = 10
always_save_checkpoint = False
init_from = "gpt2-medium"
sft_train_file = "data/classify/train.jsonl"
sft_val_file = "data/classify/val.jsonl"
batch_size = 16
gradient_accumulation_steps = 2  # 32 examples/step; 700 steps ~ 1 epoch of 21,783
block_size = 128
train_1d_only = True
learning_rate = 1e-3
weight_decay = 0.0  # never applied to 1-D parameters anyway
max_iters = 700
lr_decay_iters = 700
min_lr = 1e-4
warmup_iters = 50
