"""The byte-level BPE tokenizer, its training (train_bpe) and the corpus encoder (encode)."""
