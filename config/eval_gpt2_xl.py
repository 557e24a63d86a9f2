# OpenAI's gpt2-xl (1558M) zero-shot on Tiny Shakespeare in GPT-2 BPE: the baseline a fine-tune beats.
#   python data/shakespeare/prepare.py && python eval.py config/eval_gpt2_xl.py
# batch_size for a 24 GB GPU: weights 1,558M x (4 fp32 + 2 bf16 copy) bytes = 8.7 GB, plus
# per sequence 1024 x 50,257 logits x (2 bf16 + 4 fp32 + 4 log-softmax) bytes = 0.48 GB:
# 8.7 + 8 x 0.48 = 12.5 GB. The 36,059 val tokens are 35 windows of 1024 = 5 batches.
init_from = "gpt2-xl"
dataset = "shakespeare"
batch_size = 8
block_size = 1024  # GPT-2's full context
eval_iters = 0  # the whole val split
