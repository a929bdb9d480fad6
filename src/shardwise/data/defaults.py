"""Data defaults the config declares and the samplers use, importable without numpy or torch."""

# Samples sorted together. A larger window sorts a sparse tail of long sequences more densely
# (less padding); a smaller one keeps more step-to-step randomness, since steps run from a
# window's longest samples to its shortest. 2048 samples of ~100 tokens make ~50 batches of
# 4096 tokens, the size of `group_by_length`'s 50-batch megabatches; a dataset smaller than
# the window is sorted whole every epoch. Changing it changes the stream: keep it on resume.
# TrainConfig.sort_window defaults to this (benchmarks/README.md: seq_balance at 2048 and 512).
DEFAULT_SORT_WINDOW = 2048
