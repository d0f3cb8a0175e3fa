"""Weights in every form users bring them (ours, the reference release, timm, Hugging Face): reading,
adapting to a model, `model.init`, models from a config or a finished run, export, the encoder for library use."""
