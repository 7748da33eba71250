"""keras-adam: Adam for Keras 3, exact and compatible, with the Adam family behind flags.

The optimizer is `keras_adam.Adam`; the math of one step is in
`keras_adam.update_rule`.
"""

from keras_adam.adam import Adam
from keras_adam.state import transfer_state

__version__ = "0.1.0"

__all__ = ["Adam", "__version__", "transfer_state"]
