# python adapt.py without --model: the tiny model's preset. Each value replaces AdaptConfig's default (the authors'
# run, adapt.py) for a flag not typed on the command line. Sized for a first result in minutes on 2 CPU cores in fp32.
seq_len = 256
batch_size = 8  # sequences per optimizer step, over all processes
max_tokens = 700_000
lr = 3e-3  # the best of 1.5e-3, 3e-3 and 6e-3 on the validation part (experiments/README.md)
weight_decay = 0.0
dropout = 0.0
warmup_frac = 0.02
decay_frac = 1.0
min_lr_frac = 0.1
schedule = "cosine"
kl_reduction = "token"
eval_tokens = 32_768
eval_interval = 100
ckpt_interval = 100
log_interval = 10
kl_chunk = 1024
out = "out/adapt-tiny"
