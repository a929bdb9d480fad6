"""The training loop and its parts: precision, LR schedule, the worker's whole job."""
