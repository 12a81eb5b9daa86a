"""Layer 1, pure math on tensors (no DeepSpeed, no I/O): the BoN distribution and F estimator, losses and
advantages, frontier statistics, the exactly solvable toy world."""
