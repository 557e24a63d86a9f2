# The baby GPT on Tiny Shakespeare, characters: a quick sanity check on a GPU (nanoGPT's: ~3 min on an A100).
# 6 layers x 6 heads x 384 wide = 10.65M parameters, context 256 characters.
# 64 batch x 256 block = 16,384 tokens/iter; 1,003,854 train tokens -> ~61 iters per epoch;
# 5000 iters ~ 82 epochs, so dropout 0.2 fights the overfitting of a small dataset.
out_dir = "out-shakespeare-char"
eval_interval = 250  # evaluating often: it overfits
eval_iters = 200
log_interval = 10
always_save_checkpoint = False  # keep the best only

dataset = "shakespeare_char"
gradient_accumulation_steps = 1
batch_size = 64
block_size = 256

n_layer = 6
n_head = 6
n_embd = 384
dropout = 0.2

learning_rate = 1e-3  # a small model tolerates a higher rate
max_iters = 5000
lr_decay_iters = 5000  # = max_iters
min_lr = 1e-4  # = learning_rate / 10
beta2 = 0.99  # a little larger: few tokens per iteration
warmup_iters = 100
