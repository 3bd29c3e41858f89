"""The optimizer steps every implementation takes in the parity checks: plain SGD and Adam with
PyTorch's definitions (Adam adds eps to the bias-corrected sqrt(v); Keras adds it before the
bias correction, so its runner converts eps to keep the same update)."""

OPTIMIZERS = {
    "sgd": {"lr": 0.1},
    "adam": {"lr": 1e-3, "b1": 0.9, "b2": 0.999, "eps": 1e-8},
}
