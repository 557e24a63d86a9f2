# Instruction-tune GPT-2 small (124M) on the 1,100-example set, loss on the answers only, for as many
# epochs as validation says (early stopping), then chat with it and have a judge score its answers.
#   python data/instruct/prepare.py                 # -> data/instruct/{train,val,test}.jsonl (935/55/110)
#   python train.py config/finetune_instruct.py     # --init_from=out-my-base for one of our pretrained runs
#   python sample.py --out_dir=out-instruct --chat
#   python eval.py --out_dir=out-instruct --tasks=judge --judge_url=http://localhost:8000/v1 --judge_model=NAME
# Prompts use Alpaca's template (recorded in the checkpoint: chat and the judge reuse it); the loss covers
# the response and its <|endoftext|>. Examples are 41-93 GPT-2 tokens (mean 60), so block_size 256 cuts
# none, and a row is padded to the longest of its batch only.
# 8 examples x 1 accum per step; 935 train examples -> ~117 steps per epoch; 936 steps = 8 epochs at most.
# Validation (55 examples) twice an epoch; early_stop_patience 3 ends the run 1.5 epochs after val
# stopped improving, with best.json on the best checkpoint (what sample.py, eval.py and export_hf.py read).
out_dir = "out-instruct"
eval_interval = 58  # ~ half an epoch
eval_iters = 0  # the whole validation split
log_interval = 10
always_save_checkpoint = False  # keep the best (and the last); each is a full 124M model, 1.5 GB with AdamW
early_stop_patience = 3

init_from = "gpt2"
sft_train_file = "data/instruct/train.jsonl"
sft_val_file = "data/instruct/val.jsonl"
batch_size = 8
gradient_accumulation_steps = 1
block_size = 256

learning_rate = 5e-5  # full fine-tuning of a pretrained model: a small rate (the book's 5e-5, AdamW)
weight_decay = 0.1
max_iters = 936  # 8 epochs; early stopping usually ends it sooner
lr_decay_iters = 936
min_lr = 5e-6
warmup_iters = 20
dropout = 0.0
