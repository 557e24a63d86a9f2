# Tiny Shakespeare, characters, on two CPU cores in about two minutes, start to finish, in float32: what
# every x86 laptop computes natively (an AVX2 CPU has no bfloat16 matmuls). The quick start.
#     python train.py config/train_shakespeare_char_cpu.py
#     python bench.py config/train_shakespeare_char_cpu.py --plan           # its ETA on this machine, as loaded
#     python benchmarks/time_to_quality.py --nanogpt_dir=/path/to/nanoGPT   # times it beside nanoGPT's
# A 3 x 96 model, sized by a sweep at nanoGPT's wall time: at two minutes a narrow model that takes many
# steps learns more than a wide one that takes few. The settings are the 10-minute recipe's
# (train_shakespeare_char_cpu_10min.py): rotary positions, no biases, an untied head, QK-norm, exact
# GELU, Muon + AdamW on a warmup-stable-decay schedule, batch 16, every window once per epoch, no
# evaluation before training. On top, what the previous characters were, given to each position
# directly: bigram and trigram input embeddings, smear, and a previous-position mix of q, k and v; and
# 3 heads of 32 instead of 4 of 24 (attention's kernels are faster at head size 32).
# Measurements, the sweeps and what was tried: docs/cpu_recipe.md and docs/LOG.md.
# For a CPU with native bf16 (AMX) there is the 4 x 192 recipe of train_shakespeare_char_cpu_bf16.py.
# Arithmetic: 16 batch x 128 block = 2,048 tokens/iter; 1,000 iters -> 2,048,000 tokens = 2.0 epochs of the
# 1,003,854 train tokens. 3 layers x 96 wide = 344,928 parameters, 2,333,184 with the bigram table
# (4,290 x 96), the trigram table (16,411 x 96) and the 960 mixing weights.
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
n_head = 3
n_embd = 96
dropout = 0.0  # two epochs are too few to overfit
activation = "gelu"
rotary_dim = 16
bias = False
tie_weights = False
qk_norm = True
bigram_embed = 4290  # 65 x 66 rows: every (previous character or the start, character) pair its own row
trigram_embed = 16411  # 11,228 distinct trigrams in the training text, hashed into 16,411 rows
smear = True
qkv_shift = True

optimizer = "muon"  # torch.optim.Muon for the blocks' matrices, AdamW at learning_rate for the rest
muon_lr = 0.02
learning_rate = 4e-3  # AdamW's rate (embeddings, head, gains); both rates x1.5 lost in the sweep (docs/LOG.md)
max_iters = 1000
lr_decay_iters = 1000  # = max_iters
lr_schedule = "wsd"
cooldown_frac = 0.3
min_lr = 4e-4
beta2 = 0.99
warmup_iters = 30

device = "cpu"
dtype = "float32"  # at 128 wide and less, bf16 was slower than float32 even on an AMX CPU (docs/cpu_recipe.md)
compile = False  # on two cores inductor's code was not faster than eager, and compiling costs a minute
