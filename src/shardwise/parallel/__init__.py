"""Parallel modes: each one changes a model (or how its gradients travel), never the loop."""
