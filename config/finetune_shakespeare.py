# Fine-tune OpenAI's GPT-2 XL (1.56B parameters) on Tiny Shakespeare in GPT-2 BPE, nanoGPT's recipe.
#   python data/shakespeare/prepare.py && python train.py config/finetune_shakespeare.py
# 1 batch x 32 accum x 1024 tokens = 32,768 tokens/iter; 301,966 train tokens -> ~9.2 iters per epoch;
# 20 iters ~ 2.2 epochs: enough to take on the style, and a small dataset overfits soon after.
# Memory (memory.py's estimate, bf16, printed at start): full fine-tuning ~29 GB = weights 5.8 + grads
# 5.8 + AdamW states 11.6 + activations, logits and bf16 weight copies ~6. On a 24 GB GPU add one of
# --optimizer=adamw8bit (~21 GB), --optimizer=adamw8bit --activation_checkpointing=True (~16 GB),
# --lora_rank=8 (~12 GB), or a smaller --init_from=gpt2-large (~15 GB).
out_dir = "out-shakespeare"
eval_interval = 5
eval_iters = 40  # 40 x 1 x 1024 covers all 35 windows of the 36,059-token val split
log_interval = 1
always_save_checkpoint = False  # save only when val improves: each gpt2-xl checkpoint is ~6 GB

init_from = "gpt2-xl"
dataset = "shakespeare"
batch_size = 1
gradient_accumulation_steps = 32
block_size = 1024  # GPT-2's full context

learning_rate = 3e-5  # small and constant: nudge the pretrained weights, don't retrain them
max_iters = 20
decay_lr = False
