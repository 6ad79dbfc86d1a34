"""tinygpt: a GPT-2-shaped language model built from scratch, from corpus to quantized GGUF."""

__version__ = "0.1.0"
