"""mae: Masked Autoencoder pretraining for vision transformers."""

__version__ = "0.1.0"
