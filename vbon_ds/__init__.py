"""vbon_ds: Variational Best-of-N alignment of language models with DeepSpeed."""

__version__ = "0.1.0"
