# python eval.py without --model: the tiny model's preset. Each value replaces EvalConfig's default for a flag not
# typed.
seq_len = 256
batch_size = 8
eval_tokens = 65_536
gen_tokens = 64
out = "out/eval-tiny"
