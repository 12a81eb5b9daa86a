"""Layer 3, data: prompt sets (prompts, tldr), the on-disk reference cache, reward functions."""
