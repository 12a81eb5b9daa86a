"""Layer 6, commands that compose jobs: the demo, sweeps, Slurm launch (the `vbon` CLI itself is
vbon_ds/cli.py)."""
