"""keras-adam: Adam for Keras 3, exact and compatible, with the Adam family behind flags.

The optimizer is `keras_adam.Adam`; the math of one step is in
`keras_adam.update_rule`.
"""

from keras_adam.adam import Adam

__version__ = "0.1.0"

__all__ = ["Adam", "__version__"]
