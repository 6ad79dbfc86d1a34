"""Leaving PyTorch: Hugging Face export, GGUF writer and reader, quantizers, the llama.cpp runner."""
