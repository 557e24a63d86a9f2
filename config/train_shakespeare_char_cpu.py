# Tiny Shakespeare, characters, on two CPU cores in under three minutes, start to finish, in float32: what
# every x86 laptop computes natively (an AVX2 CPU has no bfloat16 matmuls).
#     python train.py config/train_shakespeare_char_cpu.py
#     python benchmarks/time_to_quality.py --nanogpt_dir=../shared/reference/nanoGPT   # times it beside nanoGPT's
# On a 2-core AVX2 EPYC: val 1.60 in about 166 s, where nanoGPT's own CPU recipe reaches 1.886 in about the
# same time on the same machine (README, "Learning faster"). Sized by a sweep at that wall time, all with
# the 10-minute recipe's settings: 4 x 192 (350 iterations) 1.702, 4 x 128 (600) 1.650, 3 x 128 (750)
# 1.626, 2 x 128 (1,000) 1.623, 3 x 96 (1,100) 1.604, 3 x 64 (1,350, 135 s) 1.650: at two minutes a
# narrow model that takes more steps learns more than a wide one that takes fewer.
# The settings are the 10-minute recipe's (train_shakespeare_char_cpu_10min.py, where each is argued):
# rotary positions, no biases, an untied head, QK-norm, exact GELU, Muon + AdamW on a warmup-stable-decay
# schedule, batch 16, every window once per epoch, no evaluation before training.
# For a CPU with native bf16 (AMX) there is the 4 x 192 recipe of train_shakespeare_char_cpu_bf16.py.
# Arithmetic: 16 batch x 128 block = 2,048 tokens/iter; 1,100 iters -> 2,252,800 tokens = 2.2 epochs of the
# 1,003,854 train tokens; 344,928 parameters -> 6.5 tokens per parameter.
out_dir = "out-shakespeare-char-cpu"
eval_interval = 100000  # only at the last iteration (initial_eval below)
eval_iters = 0  # the whole validation split (111,540 tokens), so the figure compares run to run
initial_eval = False  # no evaluation before training: its seconds go to training
log_interval = 20
always_save_checkpoint = False

dataset = "shakespeare_char"
sampling = "sequential"  # every 128-token window once per epoch, a new order each epoch
gradient_accumulation_steps = 1
batch_size = 16
block_size = 128

n_layer = 3
n_head = 4
n_embd = 96
dropout = 0.0  # two epochs are too few to overfit
activation = "gelu"
rotary_dim = 16
bias = False
tie_weights = False
qk_norm = True

optimizer = "muon"  # torch.optim.Muon for the blocks' matrices, AdamW at learning_rate for the rest
muon_lr = 0.02
learning_rate = 4e-3  # (both x1.5: val 1.624 against 1.604, one run each)
max_iters = 1100
lr_decay_iters = 1100  # = max_iters
lr_schedule = "wsd"
cooldown_frac = 0.3
min_lr = 4e-4
beta2 = 0.99
warmup_iters = 30

device = "cpu"
dtype = "float32"  # at 128 wide and less, bf16 was slower than float32 even on the AMX Xeon (docs/cpu_recipe.md)
compile = False  # on two cores inductor's code was not faster than eager, and compiling costs a minute
