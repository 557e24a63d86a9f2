# Tiny Shakespeare, characters, on a laptop-class CPU in about two minutes, start to finish:
#     python train.py config/train_shakespeare_char_cpu.py
#     python benchmarks/time_to_quality.py          # runs exactly that, times it, prints the final val loss
# nanoGPT's CPU recipe (4 x 128, block 64, batch 12, 2000 iters, float32) reaches val 1.886 in 116 s on
# a 2-core AVX-512 Xeon. This one spends the same wall time on more tokens per second instead:
# - precision: dtype 'auto' = bfloat16 autocast on CPUs with AVX512-BF16/AMX, float32 elsewhere. At 192
#   wide the matmuls are big enough for AMX to pay: 4 x 192, block 128, batch 32 trained at 1,826 tok/s
#   in bf16 vs 1,335 in float32 (1 thread, machine under load; interleaved medians). At 128 wide bf16
#   lost (2,446 vs 2,799), so narrower models should train in float32.
# - no dropout: 2.6M tokens is ~2.6 epochs of 1,003,854 train tokens, too few to overfit.
# - a high learning rate with a short warmup and a cosine decay over the whole run: few iterations.
# - no evaluation during the run: the one at iteration 0 and the final one, each over the whole fixed
#   validation split (111,540 tokens) so the figure is comparable run to run.
# Arithmetic: 32 batch x 128 block = 4,096 tokens/iter; 640 iters -> 2,621,440 tokens = 2.6 epochs;
# 1.82M parameters -> 1.4 tokens/parameter.
# Measured (python benchmarks/time_to_quality.py --threads=1, machine shared with other jobs, load 5-8):
# final val loss 1.7777 (train 1.62) in 612 s at 2,500-7,700 tokens/s. Validation runs ~0.15 above
# training on this split at this stage, so val 1.60 needs train ~1.45, i.e. more tokens than 120 s of
# this CPU trains. On a quiet machine, if the run takes longer than ~110 s, lower max_iters (and
# lr_decay_iters) in proportion.
out_dir = "out-shakespeare-char-cpu"
eval_interval = 100000  # only at iteration 0 and the last
eval_iters = 0  # the whole validation split
log_interval = 20
always_save_checkpoint = False

dataset = "shakespeare_char"
gradient_accumulation_steps = 1
batch_size = 32
block_size = 128

n_layer = 4
n_head = 4
n_embd = 192
dropout = 0.0

learning_rate = 2e-3
max_iters = 640
lr_decay_iters = 640  # = max_iters
min_lr = 2e-4  # = learning_rate / 10
beta2 = 0.99  # few tokens per iteration
warmup_iters = 40

device = "cpu"
dtype = "auto"
compile = False  # inductor's code was slower than eager on the 2-core Xeon, and compiling costs 30-70 s
