"""Layer 5a, algorithms: the registry of algorithms, the objective, rollouts, on-policy and offline
experience and losses, and the update they share (step.py)."""
