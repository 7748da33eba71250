"""Hyperparameter search for `keras_adam.Adam` (β1, β2, η) with KerasTuner.

The search space, HyperModel, `search` entry point and the
`keras-adam-tune` command are being built; this package is installed beside
`keras_adam` so that its import path is stable.
"""

__all__: list[str] = []
