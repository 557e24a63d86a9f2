# GPT-J-6B as a moderation classifier on one 11 GB card, training only the 1-D parameters (biases and
# LayerNorm gains, as BitFit, Ben Zaken et al. 2021) above a frozen int8 base: way 1 of 4.
#   python data/hate_speech/prepare.py
#   python train.py config/finetune_gptj_1d.py
#   python eval.py --out_dir=out-gptj-1d --tasks=generate --data_file=data/hate_speech/val.jsonl --max_new_tokens=4
# Trained: 861,408 parameters per GPT-J-6B: 28 blocks x (ln_1 4096+4096, fc_in bias 16384, fc_out bias
# 4096) + ln_f 8192 + lm_head's bias 50400 (GPT-J's attention has no biases). The biases of the int8
# layers stay float32 and train; base_dtype stays float32 for them. Data, batch and schedule as
# finetune_gptj_lora_all.py (which explains them), with BitFit's higher learning rate.
out_dir = "out-gptj-1d"
eval_interval = 25
eval_iters = 0
log_interval = 5
always_save_checkpoint = False

init_from = "EleutherAI/gpt-j-6b"
sft_train_file = "data/hate_speech/train.jsonl"
sft_val_file = "data/hate_speech/val.jsonl"
batch_size = 4
gradient_accumulation_steps = 4  # 16 examples/step; 250 steps = 4 epochs of 1,000
block_size = 128

base_quant = "int8"
train_1d_only = True
optimizer = "adamw8bit"  # (tensors under 4,096 elements keep 32-bit states: most of these)
activation_checkpointing = True

learning_rate = 1e-3
weight_decay = 0.0  # never applied to 1-D parameters anyway
max_iters = 250
lr_decay_iters = 250
min_lr = 1e-4
warmup_iters = 20
dropout = 0.0
