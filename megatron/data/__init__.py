"""Data: Megatron ``.bin/.idx`` indexed datasets, GPT-NeoX's GPT2 index maps (the exact
training order), Pythia's pre-shuffled stream, blending, and each rank's loader.

Imports only errors and processes (readers die with their rank); never the model,
parallel groups or training."""
