# Classifier comparison, way 4 of 4: no training. GPT-2 medium is shown 4 labelled training messages
# (round-robin over the labels, seeded) before each test message, and its greedy answer is scored.
#   python eval.py config/finetune_classify_fewshot.py
# A config for eval.py, not train.py. The prompt is 4 x "{prompt}{completion}\n\n" + the test prompt:
# 5 x (18 format tokens + a tweet) + 4 labels, a few hundred of GPT-2's 1024 tokens. The fine-tuned
# runs are scored by the same code with k_shot=0 (see finetune_classify_lora.py): the numbers compare.
init_from = "gpt2-medium"
tasks = "generate"
data_file = "data/classify/test.jsonl"
shots_file = "data/classify/train.jsonl"
k_shot = 4
max_new_tokens = 4  # each label is 1 GPT-2 token; the answer ends at <|endoftext|> or a newline
out_file = "eval_classify_fewshot.json"
