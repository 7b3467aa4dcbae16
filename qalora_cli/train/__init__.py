"""The fine-tuning loop and what it needs: optimizer, schedule, checkpoints, loss."""
