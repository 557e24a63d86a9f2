# Tiny Shakespeare, characters, on two CPU cores in about ten minutes, start to finish, sized for an AVX2
# CPU, which computes it in float32 (dtype 'auto' picks bf16 autocast on a CPU that has it natively):
#     python train.py config/train_shakespeare_char_cpu_10min.py
#     python benchmarks/time_to_quality.py --nanogpt_dir=/path/to/nanoGPT   # times it beside nanoGPT's
# The bf16 CPU recipe (train_shakespeare_char_cpu_bf16.py: 4 x 192, block 128, Muon + AdamW) with the options
# that paid in the project's CPU ablation (each alone, at equal wall clock, 2 seeds): rotary positions
# on 16 of each head's 48 dims, no biases, an untied head, QK-norm, and a warmup-stable-decay schedule
# (constant, then linear to min_lr over the last 30%); then, from a second sweep of its own settings,
# half the batch (16 sequences), the exact GELU, and every window once per epoch instead of random
# windows (sampling='sequential'). The tables behind each choice and the measured wall times:
# docs/cpu_recipe.md and docs/LOG.md.
# Arithmetic: 16 batch x 128 block = 2,048 tokens/iter; 1,400 iters -> 2,867,200 tokens = 2.9 epochs of
# the 1,003,854 train tokens (7,842 windows of 128).
out_dir = "out-shakespeare-char-cpu-10min"
eval_interval = 100000  # only at the last iteration (initial_eval below)
eval_iters = 0  # the whole validation split
initial_eval = False  # no evaluation before training: its seconds go to training
log_interval = 20
always_save_checkpoint = False

dataset = "shakespeare_char"
sampling = "sequential"  # every 128-token window once per epoch, a new order each epoch
gradient_accumulation_steps = 1
batch_size = 16
block_size = 128

n_layer = 4
n_head = 4
n_embd = 192
dropout = 0.0
activation = "gelu"  # exact GELU: GPT-2's tanh form to within 5e-4, and cheaper on a CPU (docs/cpu_recipe.md)
rotary_dim = 16
bias = False
tie_weights = False
qk_norm = True

optimizer = "muon"
muon_lr = 0.02
learning_rate = 4e-3
max_iters = 1400
lr_decay_iters = 1400  # = max_iters
lr_schedule = "wsd"
cooldown_frac = 0.3
min_lr = 4e-4
beta2 = 0.99
warmup_iters = 30

device = "cpu"
dtype = "auto"
compile = False
