"""Stage 2, traces: the hooks that observe a decode inside the patched llama.cpp (pre-attention
activation, router input, routing), `collect`, which records them per token and layer into sharded
.npy files with a manifest, and `TraceSet`, which reads such a folder back for training and evaluation.
Reads models through `model`; nothing here imports a later stage."""
