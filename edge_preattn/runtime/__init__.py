"""Stage 4, runtime: the expert-slot cache inside the patched llama.cpp (slot banks, cache policies),
the controller that feeds it predictions and reads its counters, and the `run` and `serve` verbs that
generate text with it. Uses models, hooks and predictors; nothing here imports the measurement stage."""
