"""Reading models: checkpoints, Hugging Face folders and GGUF files into (config, state dict, tokenizer), and the
one table of tensor names that readers and writers share. Below tinygpt.model and tinygpt.export, importing
neither, so every arrow points down."""
