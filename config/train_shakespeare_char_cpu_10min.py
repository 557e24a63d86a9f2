# Tiny Shakespeare, characters, on two CPU cores in 10 minutes, start to finish, on a 2-core AVX2 EPYC
# (float32; a CPU with native bf16 runs it ~3x faster):
#     python train.py config/train_shakespeare_char_cpu_10min.py
#     python benchmarks/time_to_quality.py --nanogpt_dir=../shared/reference/nanoGPT   # times it beside nanoGPT's
# The 2-minute recipe (train_shakespeare_char_cpu.py: 4 x 192, block 128, batch 32, Muon + AdamW) with
# the options that paid in README's ablation on that EPYC (each alone, at equal wall clock, 2 seeds):
# rotary positions on 16 of each head's 48 dims, no biases, an untied head, QK-norm, and a
# warmup-stable-decay schedule (constant, then linear to min_lr over the last 30%).
# Arithmetic: 32 batch x 128 block = 4,096 tokens/iter; 720 iters -> 2,949,120 tokens = 2.9 epochs of the
# 1,003,854 train tokens. At the EPYC's ~750 ms per iteration: ~540 s of training, plus start-up and the
# two evaluations over the whole validation split.
out_dir = "out-shakespeare-char-cpu-10min"
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
rotary_dim = 16
bias = False
tie_weights = False
qk_norm = True

optimizer = "muon"
muon_lr = 0.02
learning_rate = 4e-3
max_iters = 720
lr_decay_iters = 720  # = max_iters
lr_schedule = "wsd"
cooldown_frac = 0.3
min_lr = 4e-4
beta2 = 0.99
warmup_iters = 30

device = "cpu"
dtype = "auto"
compile = False
