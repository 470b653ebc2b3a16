"""margins: margin-based softmax losses and metric-learning losses in JAX."""
