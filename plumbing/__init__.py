"""What every training script shares and a student may skip: the run skeleton (run.py)."""
