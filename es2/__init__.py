"""es2: safety fine-tuning by Embedding Space Separation, as a reproducible pipeline."""

__version__ = "0.1.0"
