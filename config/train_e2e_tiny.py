# python train_e2e.py without --model: the tiny model's preset. Each value replaces E2EConfig's default for a flag not
# typed: the embedded SAE's layer, k and width, sized for minutes on 2 CPU cores.
layer = [2]  # the tiny model's middle layer (embedded.SAE_LAYER)
k = 16
expansion = 8
max_tokens = 1_500_000
batch_size = 8  # sequences per optimizer step, over all processes
seq_len = 256
dead_tokens = 1_000_000
eval_interval = 50
log_interval = 10
out = "out/e2e-tiny"
