# GPT-J-6B as a moderation classifier with no training at all: way 4 of 4, the baseline. Each validation
# tweet follows 4 labelled training tweets (round-robin over the labels, seeded), and the greedy answer
# is scored, exactly as the trained ways are (with k_shot=0).
#   python data/hate_speech/prepare.py
#   python eval.py config/finetune_gptj_fewshot.py
# A config for eval.py, not train.py. The base loads in int8 as the trained ways' does (~7.3 GB), so it
# runs on the same 11 GB card; the prompt is 5 x (~20 format tokens + a tweet) + 4 labels, a few hundred
# of GPT-J's 2,048 positions.
init_from = "EleutherAI/gpt-j-6b"
base_quant = "int8"
tasks = "generate"
data_file = "data/hate_speech/val.jsonl"
shots_file = "data/hate_speech/train.jsonl"
k_shot = 4
max_new_tokens = 4  # each label is 1-2 GPT-2 tokens; the answer ends at <|endoftext|> or a newline
out_file = "eval_gptj_fewshot.json"
