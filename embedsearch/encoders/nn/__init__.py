"""Neural encoders: a plain autoencoder (AE) and a variational autoencoder (VAE), in PyTorch.

``models`` holds the networks, ``train`` the training loop and its options, ``checkpoint`` the
safetensors files it writes, and ``encoder`` the :class:`embedsearch.encoders.base.Encoder` adapters
(kinds "ae" and "vae"). This package module imports nothing on purpose: ``import embedsearch``
must never import torch; only looking up kind "ae" or "vae" does.
"""
