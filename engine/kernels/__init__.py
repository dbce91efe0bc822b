"""GPU kernels (Triton) and, beside each, a torch reference with the same signature."""
