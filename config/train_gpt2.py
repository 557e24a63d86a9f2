# GPT-2 124M from scratch on FineWeb-Edu, the llm.c / build-nanogpt reproduction: one pass over ~10B tokens.
# Prepare the data first (streams the 10BT sample; ~9.99B train + 10M val tokens, ~20 GB of shards):
#   python data/fineweb/prepare.py --dataset=fineweb-edu --sample=10BT
#   python train.py config/train_gpt2.py                                   # one GPU
#   torchrun --standalone --nproc_per_node=8 train.py config/train_gpt2.py  # 8 GPUs, same tokens per step
# 16 batch x 1024 block x 32 accum = 524,288 tokens/iter (2^19, GPT-3 small's 0.5M batch), summed over
# all ranks: with 8 GPUs each rank runs 32 / 8 = 4 micro-steps.
# 10e9 tokens / 524,288 = 19,073 iters ~ one epoch; sequential sampling reads each window once.
# Memory: memory.py estimates 16.4 GiB at batch 16 (bf16), printed at start; on a smaller card halve
# batch_size and double the accumulation. Time: 19,073 iters x 524,288 tokens / your tokens/s; plan it
# with python bench.py config/train_gpt2.py --plan. Measured rates: docs/pretrain_fineweb.md.
# Reference: llm.c reproduced this model on 10B FineWeb tokens in ~90 minutes on 8x A100 80GB
# (karpathy/llm.c discussion #481).
out_dir = "out-gpt2"
eval_interval = 250  # 250 x 524,288 = 131M tokens between evaluations (76 in the run)
eval_iters = 200  # 200 x 16 x 1024 = 3.3M of the 10M validation tokens, the same ones every time
log_interval = 10
always_save_checkpoint = True  # a checkpoint at every evaluation: a long run must survive a crash
auto_resume = True  # the same command continues the run after a crash or a restart (torchrun --max-restarts)
keep_last_n = 2
wandb_log = False
wandb_project = "homegpt"
wandb_run_name = "gpt2-124M-fineweb-edu"

dataset = "fineweb-edu"
data_dir = "data/fineweb/fineweb-edu_10BT"  # prepare.py's default output for --dataset=fineweb-edu --sample=10BT
sampling = "sequential"
gradient_accumulation_steps = 32
batch_size = 16
block_size = 1024

# GPT-2 small: 12 layers x 12 heads x 768 wide, tied embeddings, biases; 124M parameters
n_layer = 12
n_head = 12
n_embd = 768
dropout = 0.0  # one pass over the data: nothing to regularise against
bias = True
tie_weights = True
vocab_size = 50304  # 50257 padded to a multiple of 64 for faster matmuls; the extra rows are never targets

learning_rate = 6e-4  # GPT-3 paper, table 2.1, for the 125M model
max_iters = 19073
weight_decay = 0.1
beta1 = 0.9
beta2 = 0.95
grad_clip = 1.0
decay_lr = True
warmup_iters = 700  # 700 x 524,288 = 367M tokens, about GPT-3's 375M warmup
lr_decay_iters = 19073  # = max_iters
min_lr = 6e-5  # = learning_rate / 10

device = "auto"
dtype = "auto"  # bfloat16 on Ampere and newer
compile = True
