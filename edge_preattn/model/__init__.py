"""Stage 1, model and build: a MoE GGUF's layout (what `inspect` prints), synthetic and widened models,
the patched llama.cpp library (built, located, bound through ctypes) and the engine that loads a model
into it and decodes. Every later stage reads models through here; nothing here imports a later stage."""
