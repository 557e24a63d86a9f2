# Instruction-tune GPT-2 medium (355M) on Stanford Alpaca (52,002 examples) with LoRA on attention.
#   python data/instruct/prepare.py --source=alpaca         # -> data/alpaca/{train,val,test}.jsonl
#   python train.py config/finetune_alpaca_lora.py            # --init_from=gpt2 on a smaller machine
# Prompts use Alpaca's template (sft.ALPACA_TEMPLATE); the loss covers the response and its <|endoftext|>.
# 16 batch x 8 accum = 128 examples/step, Alpaca-LoRA's batch size; 44,201 train examples -> ~345
# steps per epoch, 1,035 steps = 3 epochs (Alpaca-LoRA trains 3). Rows are padded to the longest
# example of each micro-batch, so a step holds at most 128 x 512 = 65,536 tokens (train.py prints
# this upper bound as "tokens per iteration"); --sft_packing=True fills rows of 512 instead.
# LoRA rank 8, alpha 16 on c_attn and attn.c_proj: 1,179,648 trained of 356,002,816 parameters (0.33%).
out_dir = "out-alpaca-lora"
eval_interval = 100  # validation loss on the completions of the 2,601 held-out examples
log_interval = 10
always_save_checkpoint = False  # keep the best; a checkpoint holds only the adapter: 4.7 MB + 9.4 MB AdamW state

init_from = "gpt2-medium"
sft_train_file = "data/alpaca/train.jsonl"
sft_val_file = "data/alpaca/val.jsonl"
batch_size = 16
gradient_accumulation_steps = 8
block_size = 512  # GPT-2 has 1024; longer examples keep the prompt's tail and the response's head

lora_rank = 8
lora_alpha = 16.0
lora_dropout = 0.05
lora_targets = "attn"
base_dtype = "bfloat16"  # the frozen 355M stored in bf16 on GPUs: halves the base's 1.4 GB (use float32 on CPU)

learning_rate = 3e-4  # LoRA tolerates a much higher rate than full fine-tuning (3e-5)
weight_decay = 0.0
max_iters = 1035
lr_decay_iters = 1035  # = max_iters
min_lr = 3e-5
warmup_iters = 100
dropout = 0.0  # the adapters have their own lora_dropout
