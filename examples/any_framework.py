"""No PyTorch needed: feed activations from any framework (JAX, numpy, ...) to an Engine."""

import numpy as np

import neuronwatch

rng = np.random.default_rng(0)
engine = neuronwatch.Engine("numpy-mlp", min_rows=1000)
engine.add_layer("hidden", activation="relu")
weights, bias = rng.normal(size=(16, 32)) / 4, np.zeros(32)
bias[[3, 11]] = -20.0  # two neurons that can never fire
for _ in range(20):
    x = rng.normal(size=(256, 16))
    engine.observe("hidden", np.maximum(x @ weights + bias, 0.0), feature_axis=-1)
stats = engine.snapshot().layers("current")["hidden"]
print("dead:", stats.dead_indices.tolist(), "asleep:", stats.count("asleep"))
