"""edge-preattn: pre-attention expert prediction and a GPU expert-slot cache for MoE GGUFs in llama.cpp.

Its folders are the stages of the data flow, each importing only from itself, earlier stages and the
shared modules here (cli, errors, files, units, interrupts): model (GGUF layout, synthetic models, the
patched library and the engine) → traces (hooks, collect) → predictors (train, export, eval) → runtime
(slot cache, controller, run, serve) → measure (bench, profile). README.md, "Package layout", lists
their modules.
"""

__version__ = "0.1.0"
