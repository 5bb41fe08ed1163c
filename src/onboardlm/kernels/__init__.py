"""Hand-written GPU kernels for what PyTorch has no fast kernel for (optional: they need Triton)."""
