# Tiny Shakespeare, characters, on two CPU cores in under three minutes, start to finish, in float32: what
# every x86 laptop computes natively (an AVX2 CPU has no bfloat16 matmuls).
#     python train.py config/train_shakespeare_char_cpu.py
#     python benchmarks/time_to_quality.py --nanogpt_dir=../shared/reference/nanoGPT   # times it beside nanoGPT's
# On a 2-core AVX2 EPYC: val 1.536 in 142 s, where nanoGPT's own CPU recipe reached 1.886 in 163 s in the
# same benchmark run (README, "Learning faster"). A 3 x 96 model, sized by a sweep at nanoGPT's wall time:
# at two minutes a narrow model that takes many steps learns more than a wide one that takes few.
# The settings are the 10-minute recipe's (train_shakespeare_char_cpu_10min.py, where each is argued):
# rotary positions, no biases, an untied head, QK-norm, exact GELU, Muon + AdamW on a warmup-stable-decay
# schedule, batch 16, every window once per epoch, no evaluation before training. On top, what the
# previous characters were, given to each position directly (README, "What came before"): bigram and
# trigram input embeddings, smear, and a previous-position mix of q, k and v; and 3 heads of 32 instead
# of 4 of 24 (attention's kernels are faster at head size 32).
# For a CPU with native bf16 (AMX) there is the 4 x 192 recipe of train_shakespeare_char_cpu_bf16.py.
# Arithmetic: 16 batch x 128 block = 2,048 tokens/iter; 1,000 iters -> 2,048,000 tokens = 2.0 epochs of the
# 1,003,854 train tokens.
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
learning_rate = 4e-3  # (both x1.5 lost before the previous-position options: val 1.624 against 1.604)
max_iters = 1000
lr_decay_iters = 1000  # = max_iters
lr_schedule = "wsd"
cooldown_frac = 0.3
min_lr = 4e-4
beta2 = 0.99
warmup_iters = 30

device = "cpu"
dtype = "float32"  # at 128 wide and less, bf16 was slower than float32 even on the AMX Xeon (docs/cpu_recipe.md)
compile = False  # on two cores inductor's code was not faster than eager, and compiling costs a minute
