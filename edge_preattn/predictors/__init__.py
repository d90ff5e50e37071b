"""Stage 3, predictors: the torch predictor networks and their losses, training on collected traces,
ONNX export and onnxruntime sessions, the weights the native library evaluates, the accuracy metrics,
the baselines beside them (cross-layer, popularity, previous token, LRU, oracle) and `eval` with its
calibration. Reads traces and models; nothing here imports the runtime or measurement stages."""
