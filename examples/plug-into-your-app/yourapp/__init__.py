"""A plain Flower PyTorch app (digits + MLP) that adopts fl-sim's FIHTCS in two lines."""
