"""Triton kernels for the GPU, each with a plain PyTorch reference in `flover.attention`."""
