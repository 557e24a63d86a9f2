# Tiny Shakespeare, characters, on a laptop-class CPU in about two minutes, start to finish:
#     python train.py config/train_shakespeare_char_cpu.py
#     python benchmarks/time_to_quality.py          # runs exactly that, times it, prints the final val loss
# nanoGPT's CPU recipe (4 x 128, block 64, batch 12, 2000 iters, float32) reaches val 1.886 in 116 s on
# a 2-core AVX-512 Xeon. This one spends the same wall time on more tokens per second instead:
# - precision: dtype 'auto' = bfloat16 autocast on CPUs with AVX512-BF16/AMX, float32 elsewhere. At 192
#   wide the matmuls are big enough for AMX to pay: 4 x 192, block 128, batch 32 trained at 1,826 tok/s
#   in bf16 vs 1,335 in float32 (1 thread, machine under load; interleaved medians). At 128 wide bf16
#   lost (2,446 vs 2,799), so narrower models should train in float32.
# - no dropout: 1.9M tokens is ~2 epochs of 1,003,854 train tokens, too few to overfit.
# - Muon (torch.optim.Muon) for the blocks' weight matrices, AdamW for the rest: at the same 480
#   iterations val 1.5864 against AdamW's 1.8144, for ~8% fewer tokens/s (17,500 vs 18,900). These
#   and the "tried" figures below come from a bare loop of the same model, data and schedule, without
#   train.py's evaluations and checkpoint (~5 s less wall time).
# - a high learning rate with a short warmup and a cosine decay over the whole run: few iterations.
# - no evaluation during the run: the one at iteration 0 and the final one, each over the whole fixed
#   validation split (111,540 tokens) so the figure is comparable run to run.
# Arithmetic: 32 batch x 128 block = 4,096 tokens/iter; 470 iters -> 1,925,120 tokens = 1.9 epochs;
# 1.82M parameters -> 1.1 tokens/parameter. At ~17,500 tokens/s (quiet machine, 2 threads) that is
# 110 s of training, plus ~5 s of start-up, the two evaluations and the checkpoint.
# Measured (python benchmarks/time_to_quality.py, quiet 2-core AVX512-BF16/AMX Xeon): this file, val
# 1.5944 in 115.2 s at 17,551 tokens/s. Tried and not better within the budget: a linear decay to 0
# over the last 40% (1.5843 in 110.8 s, about the same), weight_decay 0 (1.5996 in train.py),
# 4 x 256 (14,700 tokens/s, 1.6584 after 330 iterations), 6 x 192 (10,000 tokens/s, 1.6753 after 330),
# batch 24 for 587 iterations (1.6083).
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

# Muon for the blocks' matrices (momentum orthogonalised, torch.optim.Muon); AdamW at learning_rate
# for the embeddings/head, biases and gains
optimizer = "muon"
muon_lr = 0.02  # 0.04 over 440 iterations: 1.6103; 0.03 with a decay to 0: 1.6318
learning_rate = 4e-3
max_iters = 470
lr_decay_iters = 470  # = max_iters
min_lr = 4e-4  # = learning_rate / 10 (Muon's rate falls 10x alike: 0.02 -> 0.002)
beta2 = 0.99  # few tokens per iteration
warmup_iters = 30

device = "cpu"
dtype = "auto"
compile = False  # inductor's code was slower than eager on the 2-core Xeon, and compiling costs 30-70 s
