"""Training: optimizer, losses, pure step functions, the loop."""
