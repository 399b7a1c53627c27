"""Operations of the forward pass: each PyTorch reference beside the Triton kernel it checks."""
