"""QA-LoRA: group pooling, the adapter layer, injection, adapter files."""
