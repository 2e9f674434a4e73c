"""What the training scripts cost, counted from the shapes: FLOPs per token (flops.py)."""
