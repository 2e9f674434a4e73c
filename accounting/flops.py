"""
Training FLOPs, counted from the shapes, for MFU (adapt.py, tools/bench.py) and the loss-vs-compute frontier
(experiments/frontier.py, the paper's Tables 1-2). Each formula equals torch's FlopCounterMode on one real step of the
code it counts (tests/test_flops.py).

Kaplan et al. (2020)'s convention: a matmul costs 2 FLOPs per weight per token forward; its backward costs 2 more for
the gradient to its input and another 2 for the weight gradient (the "6N" of training). The language model is always
frozen here: its backward (e2e SAEs, LoRA) is to the activations only, 2 per weight. Elementwise work (norms, RoPE,
softmax, activations, Adam) is not counted. Every function takes the numbers it needs: a model's shape (ModelConfig),
an SAE's shape, the step's batch and sequence length.
"""
from __future__ import annotations

import math

QKV = ("q_proj", "k_proj", "v_proj")


# ----------------------------------------------------------------------------------------------------------------------
# The model (model.py)


def block_flops(model_cfg, seq_len: int, backward: bool = False, input_grad: bool = True) -> float:
    """FLOPs per token of one decoder block. Forward: 2 per projection weight, plus the attention scores: QK^T and AV,
    2 * head_dim FLOPs per (query, key) pair each, over seq_len / 2 keys on average (causal: fused kernels skip the
    masked half), so 2 * n_head * head_dim * seq_len. backward=True: its backward to the activations (frozen weights):
    2 per weight again, and twice the attention forward (both operands of QK^T and of AV are activations: 4 matmuls; a
    fused kernel's recomputation of the scores is not counted). input_grad=False: the block's input carries no
    gradient, so q/k/v_proj skip their input gradient (the lowest adapted block of adapt.py)."""
    linears = model_cfg.block_linears()
    weights = sum(i * o for i, o in linears.values())
    attn = 2 * model_cfg.n_head * model_cfg.head_dim * seq_len
    if not backward:
        return 2 * weights + attn
    qkv = sum(i * o for name, (i, o) in linears.items() if name in QKV)
    return 2 * (weights - (0 if input_grad else qkv)) + 2 * attn


def head_flops(model_cfg) -> float:
    """FLOPs per position of the lm_head (2 per weight), forward; its backward to the input costs the same."""
    return 2 * model_cfg.vocab_size * model_cfg.d_model


def forward_flops(model_cfg, seq_len: int, stop_at: int | None = None) -> float:
    """Forward FLOPs per token of model(idx, stop_at=...): blocks 0..stop_at, and the lm_head when stop_at is None
    (the whole model)."""
    blocks = model_cfg.n_layer if stop_at is None else stop_at + 1
    return blocks * block_flops(model_cfg, seq_len) + (head_flops(model_cfg) if stop_at is None else 0)


# ----------------------------------------------------------------------------------------------------------------------
# LoRA (lora.py) and the SAE (sae.py)


def lora_flops(model_cfg, rank: int, layers: list[int], targets: tuple[str, ...] | None = None) -> float:
    """FLOPs per token of the adapters' own matmuls in one training step: x -> A x -> B A x costs 2 r (in + out)
    forward; the backward 2 r (in + out) more for the A and B gradients, 2 r out for the gradient to A x, and 2 r in
    for the gradient to x (lora.LoRALinear.forward). Only the training region carries gradients: the input of the
    lowest adapted block has none (nothing before it trains), so its adapted projections of that input (q/k/v_proj)
    skip the last term. The frozen weights' own cost is block_flops'. targets None: every projection (lora.TARGETS,
    adapt.py's)."""
    total = 0
    for i in sorted(layers):
        for name, (n_in, n_out) in model_cfg.block_linears().items():
            if targets is None or name in targets:
                skip = i == min(layers) and name in QKV
                total += 2 * rank * (n_in + n_out) * 2 + 2 * rank * n_out + (0 if skip else 2 * rank * n_in)
    return total


def sae_training_flops(d_in: int, d_sae: int, arch: str, k: int | float | None = None, auxk: bool = False) -> float:
    """FLOPs per token of one training/sae_loss.training_loss forward and backward (train_sae.py's step), as the code
    computes them:

    - encoder: every latent's pre-activation, dense: 2 d m; backward: the W_enc gradient (2 d m) and the gradient to
      the encoder input x - b_dec, which b_dec needs (2 d m). JumpReLU computes the pre-activations twice (encode
      runs its own; the first ones feed the L0 penalty): 2 d m more;
    - TopK decoder: k rows of W_dec per token (decode_sparse: 2 k d); backward: the k kept values' gradient and the
      gradient of those k rows (2 k d each). BatchTopK / JumpReLU decode densely: 2 m d, backward 4 m d;
    - AuxK (TopK / BatchTopK, on a step where some latent is dead): the dead latents decode through a dense
      (tokens, m) @ W_dec: 2 m d, backward 4 m d."""
    dense = 2 * d_in * d_sae
    decoder = 3 * (2 * k * d_in if arch == "topk" else dense)
    return (4 if arch == "jumprelu" else 3) * dense + decoder + (3 * dense if auxk and arch != "jumprelu" else 0)


def sae_splice_flops(d_in: int, d_sae: int, arch: str, k: int | float | None = None, *, grad_input: bool = False,
                     grad_weights: bool = False) -> float:
    """FLOPs per token of SAE.forward spliced into a model, and of the backward asked for: grad_input (a frozen SAE
    with trained adapters before it, adapt.py), grad_weights (every parameter, train_e2e.py; b_dec's gradient runs
    through the encoder input too). Counted as sae_training_flops counts:

    - TopK (encode_topk, decode_sparse): the dense encoder (2 d m) and k rows of W_dec (2 k d); backward: the kept
      values' gradient (2 k d) and the gradient to the encoder input through the k kept columns of W_enc (2 k d,
      TopKEncoder's sparse backward); with weights also the k rows of W_dec (2 k d) and W_enc's gradient, dense
      (TopKEncoder scatters it: 2 d m);
    - dense (JumpReLU; BatchTopK as saved): encoder and decoder 2 d m each; backward: codes and input 2 d m each, with
      weights W_dec and W_enc 2 d m each."""
    dense = 2 * d_in * d_sae
    if arch == "topk":
        rows = 2 * k * d_in
        grads = (2 * rows if grad_input or grad_weights else 0) + (rows + dense if grad_weights else 0)
        return dense + rows + grads
    return 2 * dense + (2 * dense if grad_input or grad_weights else 0) + (2 * dense if grad_weights else 0)


# ----------------------------------------------------------------------------------------------------------------------
# Eq. 7 (splice.kl_and_ce) and one step of each training script


def kl_flops(model_cfg, batch: int, seq_len: int, chunk: int | None) -> float:
    """FLOPs per token of a (batch, seq_len) batch in one splice.kl_and_ce with gradients: the lm_head of both passes
    (2 V d each) and the spliced one's backward to its input (2 V d), on the predicted positions (seq_len - 1 of
    seq_len). When those span more than one `chunk`, each chunk runs under activation checkpointing and both heads run
    again in the backward (2 x 2 V d more); chunk None leaves the recomputation out (model FLOPs, as MFU counts
    them)."""
    recompute = chunk is not None and batch * (seq_len - 1) > chunk
    return (3 + (2 if recompute else 0)) * head_flops(model_cfg) * (seq_len - 1) / seq_len


def adapt_step_flops(model_cfg, saes, lora_layers: list[int], rank: int, seq_len: int, micro: int,
                     kl_chunk: int | None) -> float:
    """FLOPs per token of one adapt.py training step as its loop computes it (the model and the SAEs, `saes` as
    (layer, SAE) pairs, are frozen: their backward is to the activations only; the adapters train):

    - the original pass: every block forward, without grad;
    - the spliced pass: the blocks after the first SAE when every adapter sits after it (share_prefix; never with an
      SAE inside a block, which changes that block), else every block, forward; each SAE with its backward to its input
      when adapters sit before it (sae_splice_flops);
    - the backward to the activations of the lowest adapted block and every block after it (the lowest one's input
      carries no gradient), and the adapters' own matmuls on every projection with their gradients (lora_flops);
    - Eq. 7's two heads on the predicted positions and the spliced one's backward (kl_flops); kl_chunk None leaves out
      the recomputation of the chunks (model FLOPs, for MFU)."""
    n, first, lowest = model_cfg.n_layer, saes[0][0], min(lora_layers)
    block = block_flops(model_cfg, seq_len)
    shared = lowest > first and all(s.site == "resid" for _, s in saes)  # splice.residual_only: share_prefix
    spliced = (n - first - 1 if shared else n) * block
    sae = sum(sae_splice_flops(s.d_in, s.d_sae, s.arch, s.k, grad_input=lowest <= layer) for layer, s in saes)
    backward = ((n - lowest - 1) * block_flops(model_cfg, seq_len, backward=True)
                + block_flops(model_cfg, seq_len, backward=True, input_grad=False))
    return (n * block + spliced + sae + backward + lora_flops(model_cfg, rank, lora_layers)
            + kl_flops(model_cfg, micro, seq_len, kl_chunk))


def e2e_step_flops(model_cfg, layer: int, d_sae: int, k: int, batch: int, seq_len: int, kl_chunk: int | None) -> float:
    """FLOPs per token of one train_e2e.py step (a TopK SAE of d_sae latents at `layer`, `batch` windows of seq_len)
    as its loop computes it (the model is frozen: its backward is to the activations only; the SAE trains):

    - the original pass: every block forward, without grad; blocks 0..layer are shared with the spliced pass;
    - the SAE's encoder once more without grad, for the dead-latent accounting (2 d m);
    - the spliced pass: the SAE with its weight gradients (sae_splice_flops) and blocks layer+1..last, forward and
      backward to the activations;
    - Eq. 7's two heads on the predicted positions, the spliced one's backward, any chunk recomputation (kl_flops).
      e2e+ds's downstream terms are elementwise."""
    n, d_model = model_cfg.n_layer, model_cfg.d_model
    block = block_flops(model_cfg, seq_len)
    after = (n - layer - 1) * (block + block_flops(model_cfg, seq_len, backward=True))
    return (n * block + 2 * d_model * d_sae + sae_splice_flops(d_model, d_sae, "topk", k, grad_weights=True)
            + after + kl_flops(model_cfg, batch, seq_len, kl_chunk))


def sae_buffer_windows(steps: int, batch_tokens: int, buffer_tokens: int, model_batch: int, seq_len: int,
                       include_bos: bool) -> int:
    """Windows of seq_len tokens that the first `steps` train_sae.py steps forward through the model to fill the
    activation buffer. It holds `size` activations and is filled again when the next batch would run past its end
    (the first fill also gives the geometric-median sample); a fill forwards model_batch windows at a time until it
    holds `size` activations. Every window starts with BOS (data.TokenLoader), which is dropped unless include_bos;
    the rest of the last batch is discarded. One process: N processes split the batch and the buffer, the same count
    up to rounding."""
    size = max(buffer_tokens, batch_tokens)
    fills = math.ceil(steps / (size // batch_tokens))
    return fills * math.ceil(size / (model_batch * (seq_len - (0 if include_bos else 1)))) * model_batch


def sae_run_flops(model_cfg, layer: int, d_sae: int, arch: str, k: int | None, steps: int, auxk_steps: int, *,
                  batch_tokens: int, buffer_tokens: int, model_batch: int, seq_len: int, include_bos: bool) -> float:
    """FLOPs of the first `steps` training steps of a train_sae.py run (what its `elapsed` times; held-out evaluations
    are neither timed nor counted): the partial forwards that fill the activation buffer (sae_buffer_windows, through
    blocks 0..layer only: model(idx, stop_at=layer) runs no later block and no lm_head) and the SAE steps
    (sae_training_flops), AuxK on `auxk_steps` of them. k: None for JumpReLU."""
    windows = sae_buffer_windows(steps, batch_tokens, buffer_tokens, model_batch, seq_len, include_bos)
    forward = windows * seq_len * forward_flops(model_cfg, seq_len, layer)
    step = [batch_tokens * sae_training_flops(model_cfg.d_model, d_sae, arch, k, auxk=auxk) for auxk in (False, True)]
    return forward + (steps - auxk_steps) * step[0] + auxk_steps * step[1]
