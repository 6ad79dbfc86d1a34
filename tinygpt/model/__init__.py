"""The transformer, its training loop and run bookkeeping, checkpoints, batches and sampling."""
