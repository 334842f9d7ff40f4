"""MAGI-1 in PyTorch: configs, DiT, VAE, T5 text encoder, checkpoint I/O."""
