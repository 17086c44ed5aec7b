"""slimserve: compress a causal language model, then serve it fast over gRPC."""

__version__ = "0.1.0"
