# A chat-moderation classifier (hate / offensive / neutral) from GPT-2 medium with LoRA, as text-to-text:
#   prompt     "Classify the message as hate, offensive or neutral.\nMessage: {text}\nLabel:"
#   completion " neutral"   (or " hate", " offensive"; train.py adds <|endoftext|>, the loss covers both)
#   python train.py config/finetune_classify_lora.py
#   python eval.py --out_dir=out-classify-lora --tasks=generate --data_file=data/classify/test.jsonl --max_new_tokens=4
# Data: Davidson et al. 2017 (24,783 tweets; 'class' 0 hate speech 5.8%, 1 offensive 77.4%, 2 neither
# 16.8%), tdavidson/hate_speech_offensive on the Hugging Face hub. Shuffle (seed 0) and split into
# test 2,000 / val 1,000 / train 21,783, writing each row as
#   {"prompt": PROMPT.format(text=" ".join(row["tweet"].split())), "completion": [" hate", " offensive", " neutral"][row["class"]]}
# to data/classify/{train,val,test}.jsonl. Offensive dominates: read macro F1 in eval's report, not only
# accuracy (always answering "offensive" scores 77%). No network? python data/classify/make_synthetic.py
# writes a stand-in task (weather / sport / food) in the same format to these same three files; the base
# still downloads (gpt2-medium) unless --init_from names a local model or one of your runs (docs/finetune.md).
# 16 batch x 2 accum = 32 examples/step; 21,783 / 32 = 681 steps per epoch; 700 steps ~ 1 epoch.
# The format costs 18 GPT-2 tokens, each label 1 (+ <|endoftext|>); a tweet (<= 280 characters) is
# mostly well under 100 tokens, so block_size 128 rarely truncates (and then keeps the "Label:" tail).
# LoRA rank 8 on attention: 1,179,648 trained of 356,002,816 parameters (0.33%).
# The comparison of four ways to adapt: 1, the 1-D parameters (finetune_classify_1d.py); 2, attention LoRA
# (this file); 3, LoRA on every Linear of the blocks, attention and MLP, 3,145,728 trained (0.88%; the
# MLP adapters add capacity where the attention-only adapter is short of it, for ~2.7x its size):
#   python train.py config/finetune_classify_lora.py --lora_targets=all --out_dir=out-classify-all
#   python eval.py --out_dir=out-classify-all --tasks=generate --data_file=data/classify/test.jsonl --max_new_tokens=4
# and 4, few-shot with no training (finetune_classify_fewshot.py).
out_dir = "out-classify-lora"
eval_interval = 50
log_interval = 10
always_save_checkpoint = False

init_from = "gpt2-medium"
sft_train_file = "data/classify/train.jsonl"
sft_val_file = "data/classify/val.jsonl"
batch_size = 16
gradient_accumulation_steps = 2
block_size = 128

lora_rank = 8
lora_alpha = 16.0
lora_dropout = 0.05
lora_targets = "attn"

learning_rate = 3e-4  # the LoRA paper used 2e-4 for GPT-2 medium (batch 8); a little more for batch 32
weight_decay = 0.01  # as the LoRA paper's GPT-2 runs
max_iters = 700
lr_decay_iters = 700
min_lr = 3e-5
warmup_iters = 50
dropout = 0.0
