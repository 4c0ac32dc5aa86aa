"""The tensors of fine-tuning: base models, adapter layers and their state, adapter inits.

No I/O beyond loading a model, no Flower. Every layer above builds on these.
"""
