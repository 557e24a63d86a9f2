# Tiny Shakespeare, characters, on a laptop-class CPU in about two minutes, start to finish:
#     python train.py config/train_shakespeare_char_cpu.py
#     python benchmarks/time_to_quality.py          # runs exactly that, times it, prints the final val loss
# nanoGPT's CPU recipe (4 x 128, block 64, batch 12, 2000 iters, float32) reaches val 1.886 in 116 s on
# a 2-core AVX-512 Xeon. This one spends the same wall time on more tokens per second instead:
# - precision: dtype 'auto' = bfloat16 autocast on CPUs with AVX512-BF16/AMX, float32 elsewhere. At 192
#   wide the matmuls are big enough for AMX to pay: 4 x 192, block 128, batch 32 trained at 1,826 tok/s
#   in bf16 vs 1,335 in float32 (1 thread, machine under load; interleaved medians). At 128 wide bf16
#   lost (2,446 vs 2,799), so narrower models should train in float32.
# - no dropout: 2.0M tokens is ~2 epochs of 1,003,854 train tokens, too few to overfit.
# - a high learning rate with a short warmup and a cosine decay over the whole run: few iterations.
# - no evaluation during the run: the one at iteration 0 and the final one, each over the whole fixed
#   validation split (111,540 tokens) so the figure is comparable run to run.
# Arithmetic: 32 batch x 128 block = 4,096 tokens/iter; 480 iters -> 1,966,080 tokens = 2.0 epochs;
# 1.82M parameters -> 1.1 tokens/parameter. At the measured 19,600 tokens/s (quiet machine, 2 threads)
# that is 100 s of training, plus ~5 s of start-up and the two evaluations.
# Measured (python benchmarks/time_to_quality.py, quiet 2-core AVX512-BF16/AMX Xeon): this file, val
# 1.8187 in 106.2 s at 19,700 tokens/s (learning_rate 2e-3 instead: 1.9078 in 106.3 s; 640 iterations
# at 2e-3: 1.7804 in 139.0 s, over the budget). Validation runs ~0.15 above training on this split at
# this stage: val 1.60 needs train ~1.45, more tokens than 120 s of this CPU can train at this size.
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

learning_rate = 4e-3  # 2e-3 ended at val 1.908 over the same 480 iterations: few steps want a high rate
max_iters = 480
lr_decay_iters = 480  # = max_iters
min_lr = 4e-4  # = learning_rate / 10
beta2 = 0.99  # few tokens per iteration
warmup_iters = 30

device = "cpu"
dtype = "auto"
compile = False  # inductor's code was slower than eager on the 2-core Xeon, and compiling costs 30-70 s
