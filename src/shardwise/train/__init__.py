"""The training loop and its parts: the builder, the loop, accounting, resume, the worker."""
