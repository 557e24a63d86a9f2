# The home experiment: a compute-optimal (Chinchilla, 20 tokens per parameter) GPT on one 24 GB GPU.
# 12 layers x 12 heads x 768 wide, untied embeddings, no q/k/v bias, context 1024:
#   163.08M parameters (vocab 50304) x 20 = 3.26e9 training tokens from FineWeb-Edu.
# Prepare exactly that budget (10M validation tokens come on top):
#   python data/fineweb/prepare.py --dataset=fineweb-edu --sample=10BT --tokens=chinchilla:163e6
#   -> data/fineweb/fineweb-edu_10BT_3.26e9 (3,260,000,000 train tokens)
#   python train.py config/train_gpt2_chinchilla.py
# 6 batch x 1024 block x 80 accum = 491,520 tokens/iter (~0.5M, as GPT-3 small);
# 3.26e9 / 491,520 = 6,632 iters, one epoch; sequential sampling reads every window once.
# Plan it on your card first: python bench.py config/train_gpt2_chinchilla.py --plan (micro-batch,
# accumulation, validation budget, disk, ETA), or let train.py pick the micro-batch: --batch_size=auto.
# Time, assuming ~20k tokens/s (an RTX 3090 in bf16, compiled): 491,520 / 20,000 = 24.6 s/iter,
# 6,632 x 24.6 s = 163,000 s ~ 45 h (an estimate). Check your own tokens/s in the first log lines and
# scale; measured rates are in docs/pretrain_fineweb.md.
# Evaluation and a checkpoint every 75 iters = 75 x 24.6 s ~ 31 min of GPU time (88 in the run).
# Memory: memory.py estimates 8.2 GiB at batch 6 (bf16), so 24 GB has room for torch.compile and
# fragmentation; with accumulation the batch does not change the result, only the speed.
out_dir = "out-gpt2-chinchilla"
eval_interval = 75
save_interval = 0  # checkpoints come with the evaluations (always_save_checkpoint)
eval_iters = 200  # 200 x 6 x 1024 = 1.2M of the 10M validation tokens (~20 s of forward passes)
log_interval = 1  # one line per 25 s iteration
always_save_checkpoint = True  # a 45 h run will be interrupted
auto_resume = True  # the same command continues the run after a crash or a restart (torchrun --max-restarts)
keep_last_n = 3
init_from = "scratch"
wandb_log = False
wandb_project = "homegpt"
wandb_run_name = "gpt2-163M-chinchilla"

dataset = "fineweb-edu"
data_dir = "data/fineweb/fineweb-edu_10BT_3.26e9"
sampling = "sequential"
gradient_accumulation_steps = 80
batch_size = 6
block_size = 1024

n_layer = 12
n_head = 12
n_embd = 768
dropout = 0.1
bias = True  # biases in the MLP, output projections and LayerNorms...
qkv_bias = False  # ...but not on q/k/v
tie_weights = False  # a separate lm_head: +38.6M parameters over GPT-2 small's 124M
vocab_size = 50304  # 50257 padded to a multiple of 64 for faster matmuls

learning_rate = 4e-4
max_iters = 6632
weight_decay = 0.1
beta1 = 0.9
beta2 = 0.95
grad_clip = 1.0
decay_lr = True
warmup_iters = 200  # 3% of the run, 98M tokens
lr_decay_iters = 6632  # = max_iters: cosine all the way down
min_lr = 4e-5  # = learning_rate / 10

device = "auto"
dtype = "auto"  # bfloat16 on an RTX 3090
compile = True
