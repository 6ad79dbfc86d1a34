"""Model shapes by name, kept free of torch so that the config check can read them before any job runs."""

PRESETS: dict[str, dict] = {
    "toy": dict(n_layer=4, n_head=4, n_embd=256, block_size=128),
    "small": dict(n_layer=8, n_head=8, n_embd=512, block_size=256),
}
