# GPT-2 124M from scratch with the architecture of the speedrun era: NOT MEASURED HERE. An opt-in
# variant of config/train_gpt2.py (same data, batch and length; read that file first), for a GPU.
#   python train.py config/train_gpt2_modern.py
# What it changes, each a GPTConfig / TrainConfig option (README, "Learning faster per token and per
# second"): rotary positions instead of learned ones, RMSNorm, QK-norm, ReLU² MLP, zero-initialised
# residual projections, logits soft-capped at 15, no biases, an untied head, Muon for the blocks'
# matrices, and a warmup-stable-decay schedule. These are the pieces the modded-nanogpt speedrun
# (github.com/KellerJordan/modded-nanogpt, 2024-25) kept on its way from llm.c's ~45 minutes on
# 8x H100 to a few minutes for GPT-2 small's 3.28 FineWeb val loss; that run also changed the data
# order, attention windows, embeddings and much else that homegpt does not have, so its times do
# not transfer to this config. Nothing here was run on a GPU by this project: the only measurements of
# these options are the CPU ablation in README. Models trained with rmsnorm / qk_norm / relu2 /
# logit_softcap cannot be exported to Hugging Face format (transformers has no class for them).
# Muon's learning rate 0.02 and the 40% cool-down follow the speedrun's early records; the AdamW
# rate (embeddings, head, gains) stays GPT-3's 6e-4.
out_dir = "out-gpt2-modern"
eval_interval = 250
eval_iters = 200
log_interval = 10
always_save_checkpoint = True
keep_last_n = 2
wandb_log = False
wandb_project = "homegpt"
wandb_run_name = "gpt2-124M-modern"

dataset = "fineweb-edu"
data_dir = "data/fineweb/fineweb-edu_10BT"
sampling = "sequential"
gradient_accumulation_steps = 32  # 16 x 1024 x 32 = 524,288 tokens/iter, as train_gpt2.py
batch_size = 16
block_size = 1024

n_layer = 12
n_head = 12
n_embd = 768
dropout = 0.0
vocab_size = 50304
bias = False
tie_weights = False
rotary_dim = 64  # the whole 64-dim head
norm = "rmsnorm"
qk_norm = True
activation = "relu2"
zero_init_proj = True
logit_softcap = 15.0

optimizer = "muon"
muon_lr = 0.02
muon_momentum = 0.95
learning_rate = 6e-4
max_iters = 19073  # one pass over the 10B tokens, as train_gpt2.py
weight_decay = 0.1
beta1 = 0.9
beta2 = 0.95
grad_clip = 1.0
decay_lr = True
lr_schedule = "wsd"
cooldown_frac = 0.4
warmup_iters = 700
lr_decay_iters = 19073
min_lr = 0.0

device = "auto"
dtype = "auto"
compile = True
