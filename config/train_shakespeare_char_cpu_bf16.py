# Tiny Shakespeare, characters, sized for a CPU with native bfloat16 (AVX512-BF16/AMX): about two minutes
# start to finish on two such cores. A CPU without it (AVX2) computes it in float32, several times slower:
# there train_shakespeare_char_cpu.py is the one to run.
#     python train.py config/train_shakespeare_char_cpu_bf16.py
# It was the default CPU recipe before the float32 one; the project's CPU ablation was run on it.
# A small model that keeps two cores busy: 4 layers x 4 heads x 192 wide (1.82M parameters), context 128,
# bfloat16 autocast where the CPU computes it natively (dtype 'auto'), no dropout (two epochs are too few
# to overfit), Muon for the blocks' matrices and AdamW for the rest, a short warmup and one cosine decay.
# What was tried on the way, what each choice bought and its measured times: docs/cpu_recipe.md.
# Arithmetic: 32 batch x 128 block = 4,096 tokens/iter; 470 iters -> 1,925,120 tokens = 1.9 epochs of the
# 1,003,854 train tokens; 1.82M parameters -> 1.1 tokens per parameter. Evaluations only at iteration 0 and
# at the end, each over the whole fixed validation split (111,540 tokens), so the figure compares run to run.
out_dir = "out-shakespeare-char-cpu-bf16"
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
muon_lr = 0.02
learning_rate = 4e-3
max_iters = 470
lr_decay_iters = 470  # = max_iters
min_lr = 4e-4  # = learning_rate / 10 (Muon's rate falls 10x alike: 0.02 -> 0.002)
beta2 = 0.99  # few tokens per iteration
warmup_iters = 30

device = "cpu"
dtype = "auto"
compile = False  # on two cores inductor's code was not faster than eager, and compiling costs a minute
