# python train_sae.py without --model: the embedded pipeline's SAE recipe (Gao et al.'s TopK recipe at a small scale).
# Each value replaces TrainSAEConfig's default for a flag not typed. Every value but `out` is the recipe whose hash
# names the embedded SAE's cache folder (embedded.SAE, embedded.sae_dir): the SAE `python adapt.py` splices in.
layer = [2]  # the tiny model's middle layer (embedded.SAE_LAYER)
k = 16
expansion = 8
max_tokens = 4_000_000
batch_tokens = 4096
buffer_tokens = 131_072
seq_len = 256
model_batch = 16
dead_tokens = 1_000_000
eval_interval = 250
log_interval = 50
out = "out/sae-tiny"
