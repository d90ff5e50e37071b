"""edge-preattn: pre-attention expert prediction and a GPU expert-slot cache for MoE GGUFs in llama.cpp."""

__version__ = "0.1.0"
