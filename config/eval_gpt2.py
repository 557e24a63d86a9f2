# OpenAI's gpt2 (124M) zero-shot on Tiny Shakespeare in GPT-2 BPE: the baseline a fine-tune beats.
#   python data/shakespeare/prepare.py && python eval.py config/eval_gpt2.py
# batch_size for a 24 GB GPU: weights 124M x (4 fp32 + 2 bf16 copy) bytes = 0.7 GB, plus
# per sequence 1024 x 50,257 logits x (2 bf16 + 4 fp32 + 4 log-softmax) bytes = 0.48 GB:
# 0.7 + 32 x 0.48 = 16.0 GB. The 36,059 val tokens are 35 windows of 1024 = 2 batches.
init_from = "gpt2"
dataset = "shakespeare"
batch_size = 32
block_size = 1024  # GPT-2's full context
eval_iters = 0  # the whole val split
