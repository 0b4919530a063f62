"""vlmkit: build, train, evaluate and audit vision-language models."""

__version__ = "0.1.0"
