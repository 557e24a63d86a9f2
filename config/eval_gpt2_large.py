# OpenAI's gpt2-large (774M) zero-shot on Tiny Shakespeare in GPT-2 BPE: the baseline a fine-tune beats.
#   python data/shakespeare/prepare.py && python eval.py config/eval_gpt2_large.py
# batch_size for a 24 GB GPU: weights 774M x (4 fp32 + 2 bf16 copy) bytes = 4.3 GB, plus
# per sequence 1024 x 50,257 logits x (2 bf16 + 4 fp32 + 4 log-softmax) bytes = 0.48 GB:
# 4.3 + 16 x 0.48 = 12.0 GB. The 36,059 val tokens are 35 windows of 1024 = 3 batches.
init_from = "gpt2-large"
dataset = "shakespeare"
batch_size = 16
block_size = 1024  # GPT-2's full context
eval_iters = 0  # the whole val split
