"""The coordinator: partitioning, scheduling, the engine loop, tokenizer and command line."""
