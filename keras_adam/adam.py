"""`keras_adam.Adam`: a drop-in for `keras.optimizers.Adam`.

The math of a step is in `keras_adam.update_rule`; this file wires it into
Keras's optimizer plumbing (slot variables, state, serialization).
"""

from __future__ import annotations

from typing import Any

import keras
from keras import backend, ops

from keras_adam import update_rule, validation

if backend.backend() == "tensorflow":
    import tensorflow as tf
else:  # pragma: no cover - other backends are not supported yet
    tf = None


def _densify(gradient: Any) -> Any:
    """Turn a `tf.IndexedSlices` gradient into the dense tensor it stands for."""
    if tf is not None and isinstance(gradient, tf.IndexedSlices):
        return tf.convert_to_tensor(gradient)
    return gradient


@keras.saving.register_keras_serializable(package="keras_adam")
class Adam(keras.optimizers.Optimizer):
    r"""Adam (Kingma & Ba, 2014), a drop-in for `keras.optimizers.Adam`.

    With the same arguments it follows the same trajectory as
    `keras.optimizers.Adam`, and its state (the slot variables `momentum`,
    `velocity` and, with AMSGrad, `velocity_hat`, created in the same order)
    moves between the two through `save_own_variables`/`load_own_variables`,
    `.keras` files and `tf.train.Checkpoint`.

    Each step computes, for gradient $g_t$ at step $t$:

    $$
    \begin{aligned}
    m_t &= \beta_1 m_{t-1} + (1-\beta_1) g_t, \qquad
    v_t = \beta_2 v_{t-1} + (1-\beta_2) g_t^2 \\
    \theta_t &= \theta_{t-1} - \eta\,\frac{\sqrt{1-\beta_2^t}}{1-\beta_1^t}
        \cdot \frac{m_t}{\sqrt{v_t} + \hat\epsilon}
    \end{aligned}
    $$

    `epsilon` is the paper's $\hat\epsilon$ (added before bias correction),
    as in Keras. PyTorch and Optax add $\epsilon$ after bias correction;
    the two agree when $\hat\epsilon = \epsilon\sqrt{1-\beta_2^t}$. The
    update rule itself lives in `keras_adam.update_rule`.

    Where it differs from `keras.optimizers.Adam`, it is to be more exact:

    - β powers and bias corrections are computed in float32 at least (float64
      for float64 variables), and the elementwise step of bfloat16/float16
      variables is done in float32. Keras computes in the variable's dtype,
      where `beta_2=0.999` rounds to 1.0 in bfloat16 and bf16 weights never
      move.
    - Hyperparameters reach float64 variables without a detour through
      float32. The learning-rate *variable* has dtype
      `keras.config.floatx()`, as in Keras (set floatx to "float64" for a
      float64 learning rate).
    - Loading optimizer state whose variable count or shapes do not fit
      raises `ValueError`; Keras warns and silently skips it.
    - Arguments are validated: a bad value raises `ValueError` naming the
      argument and the value.

    Example:
        >>> import keras, keras_adam
        >>> model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(1)])
        >>> model.compile(optimizer=keras_adam.Adam(learning_rate=1e-3), loss="mse")

    Args:
        learning_rate: A float > 0, a
            `keras.optimizers.schedules.LearningRateSchedule`, or a callable
            that takes no arguments and returns the learning rate $\eta$.
            Defaults to 0.001.
        beta_1: Decay rate $\beta_1 \in [0, 1)$ of the first-moment
            estimate. Defaults to 0.9.
        beta_2: Decay rate $\beta_2 \in [0, 1)$ of the second-moment
            estimate. Defaults to 0.999.
        epsilon: $\hat\epsilon \ge 0$, added to $\sqrt{v_t}$ before bias
            correction (Keras's placement). Defaults to 1e-7.
        amsgrad: Whether to use AMSGrad (Reddi et al., 2018): the
            denominator uses the running maximum of $v_t$. Defaults to False.
        weight_decay: Decoupled weight decay $\lambda \ge 0$: each step
            first sets $\theta \leftarrow \theta - \eta\lambda\theta$, as
            Keras does. Use `exclude_from_weight_decay` to spare variables.
            Defaults to None (no decay).
        clipnorm: If set, clip each gradient to this L2 norm.
        clipvalue: If set, clip each gradient elementwise to
            [-clipvalue, clipvalue].
        global_clipnorm: If set, clip all gradients together to this global
            L2 norm. At most one of the three clippings may be set.
        use_ema: Whether to keep an exponential moving average of the weights.
        ema_momentum: Momentum of that average, in [0, 1].
        ema_overwrite_frequency: If set, overwrite the weights with their
            average every this many steps.
        loss_scale_factor: If set, the loss is multiplied by it and the
            gradients divided by it.
        gradient_accumulation_steps: If set (an integer >= 2), average the
            gradients over this many calls before one update.
        name: Name of the optimizer, used as the name scope of its variables.
        **kwargs: Passed to `keras.optimizers.Optimizer` (for example the
            deprecated `decay`, which Keras ignores with a warning).
    """

    def __init__(
        self,
        learning_rate: Any = 0.001,
        beta_1: float = 0.9,
        beta_2: float = 0.999,
        epsilon: float = 1e-7,
        amsgrad: bool = False,
        weight_decay: float | None = None,
        clipnorm: float | None = None,
        clipvalue: float | None = None,
        global_clipnorm: float | None = None,
        use_ema: bool = False,
        ema_momentum: float = 0.99,
        ema_overwrite_frequency: int | None = None,
        loss_scale_factor: float | None = None,
        gradient_accumulation_steps: int | None = None,
        name: str | None = None,
        **kwargs: Any,
    ) -> None:
        learning_rate = validation.learning_rate(learning_rate)
        beta_1 = validation.decay_rate("beta_1", beta_1)
        beta_2 = validation.decay_rate("beta_2", beta_2)
        epsilon = validation.non_negative("epsilon", epsilon)
        amsgrad = validation.boolean("amsgrad", amsgrad)
        weight_decay = validation.non_negative("weight_decay", weight_decay, optional=True)
        clipnorm = validation.non_negative("clipnorm", clipnorm, optional=True)
        clipvalue = validation.non_negative("clipvalue", clipvalue, optional=True)
        global_clipnorm = validation.non_negative("global_clipnorm", global_clipnorm, optional=True)
        use_ema = validation.boolean("use_ema", use_ema)
        ema_momentum = validation.real_number("ema_momentum", ema_momentum, "a float in [0, 1]")
        if not 0 <= ema_momentum <= 1:
            raise ValueError(
                "Argument `ema_momentum` must be a float in [0, 1]. "
                f"Received: ema_momentum={ema_momentum!r}"
            )
        ema_overwrite_frequency = validation.optional_integer(
            "ema_overwrite_frequency", ema_overwrite_frequency, 1
        )
        loss_scale_factor = validation.positive(
            "loss_scale_factor", loss_scale_factor, optional=True
        )
        gradient_accumulation_steps = validation.optional_integer(
            "gradient_accumulation_steps", gradient_accumulation_steps, 2
        )
        name = validation.name(name)
        super().__init__(
            learning_rate=learning_rate,
            name=name,
            weight_decay=weight_decay,
            clipnorm=clipnorm,
            clipvalue=clipvalue,
            global_clipnorm=global_clipnorm,
            use_ema=use_ema,
            ema_momentum=ema_momentum,
            ema_overwrite_frequency=ema_overwrite_frequency,
            loss_scale_factor=loss_scale_factor,
            gradient_accumulation_steps=gradient_accumulation_steps,
            **kwargs,
        )
        self.beta_1 = beta_1
        self.beta_2 = beta_2
        self.epsilon = epsilon
        self.amsgrad = amsgrad

    # -- learning rate -----------------------------------------------------

    @property
    def learning_rate(self) -> Any:
        """The current learning rate (a schedule is evaluated at this step)."""
        return self._get_current_learning_rate()

    @learning_rate.setter
    def learning_rate(self, value: Any) -> None:
        # Numbers are validated; tensors and variables (possibly symbolic)
        # are assigned as Keras does.
        if not (ops.is_tensor(value) or isinstance(value, keras.Variable)):
            value = validation.learning_rate(value)
        keras.optimizers.Optimizer.learning_rate.fset(self, value)

    # -- state ---------------------------------------------------------------

    def build(self, var_list: list) -> None:
        """Create the slot variables for `var_list`.

        For each variable, in order: `momentum` then `velocity` (the same
        interleaving as `keras.optimizers.Adam`), then, with AMSGrad, a
        `velocity_hat` for each variable.

        Args:
            var_list: The model variables this optimizer will update.
        """
        if self.built:
            return
        super().build(var_list)
        self._momentums, self._velocities = self.add_optimizer_variables(
            var_list, ["momentum", "velocity"]
        )
        if self.amsgrad:
            self._velocity_hats = self.add_optimizer_variables(var_list, "velocity_hat")

    def _base_variable_count(self) -> int:
        """How many variables exist before `build`.

        They are the step counter, and the learning rate when it is a
        variable rather than a schedule.
        """
        return 1 + isinstance(self._learning_rate, keras.Variable)

    def load_own_variables(self, store: Any) -> None:
        """Load state saved by this class or by `keras.optimizers.Adam`.

        The saving optimizer must have had the same options and variables.
        Every array is checked before any is assigned, so a failed load
        leaves the optimizer as it was. State saved before the saving
        optimizer was built (only its step counter and learning rate) loads
        into a built optimizer with zero moments, which is exactly that state.

        Args:
            store: A mapping from "0", "1", ... to arrays.

        Raises:
            ValueError: if the number of saved arrays or any shape does not
                fit this optimizer's variables.
        """
        own = self.variables
        saved = [store[str(i)] for i in range(len(store.keys()))]
        if len(saved) != len(own):
            unbuilt_state = len(saved) == self._base_variable_count() and self.built
            if not unbuilt_state:
                hint = (
                    " This optimizer is not built yet: call "
                    "`optimizer.build(model.trainable_variables)` first."
                    if not self.built
                    else " Was the state saved with other options (amsgrad, use_ema, "
                    "gradient_accumulation_steps, a learning-rate schedule) or for "
                    "another model?"
                )
                raise ValueError(
                    f"Cannot load optimizer state into '{self.name}': the saved state "
                    f"has {len(saved)} variables but this optimizer has {len(own)}.{hint}"
                )
        for i, (variable, value) in enumerate(zip(own, saved, strict=False)):
            if tuple(variable.shape) != tuple(value.shape):
                raise ValueError(
                    f"Cannot load optimizer state into '{self.name}': saved variable {i} "
                    f"has shape {tuple(value.shape)} but '{variable.path}' has shape "
                    f"{tuple(variable.shape)}."
                )
        for variable, value in zip(own, saved, strict=False):
            variable.assign(value)
        for variable in own[len(saved) :]:
            variable.assign(ops.zeros(variable.shape, dtype=variable.dtype))

    def set_weights(self, weights: list) -> None:
        """Set all optimizer variables from a list of arrays.

        Raises:
            ValueError: if the optimizer is not built, or the list's length
                or any shape does not fit.
        """
        if self.built and len(weights) != len(self.variables):
            raise ValueError(
                f"`set_weights` on '{self.name}' got {len(weights)} arrays but the "
                f"optimizer has {len(self.variables)} variables."
            )
        super().set_weights(weights)

    # -- the step ------------------------------------------------------------

    def _apply_weight_decay(self, variables: list) -> None:
        # Decoupled weight decay is part of `update_step`, computed in the
        # step's precision; Keras's separate pass is not used.
        return

    def update_step(self, gradient: Any, variable: Any, learning_rate: Any) -> None:
        """Apply one Adam step to `variable` (see `keras_adam.update_rule`).

        Args:
            gradient: The (clipped, unscaled) gradient, dense or
                `tf.IndexedSlices`.
            variable: The model variable.
            learning_rate: The current learning rate.
        """
        index = self._get_variable_index(variable)
        dtype = update_rule.compute_dtype(backend.standardize_dtype(variable.dtype))

        def read(x: Any) -> Any:
            return ops.cast(x, dtype)

        alpha = update_rule.step_size(
            learning_rate, self.beta_1, self.beta_2, self.iterations + 1, dtype
        )
        decay = None
        if self.weight_decay and self._use_weight_decay(variable):
            decay = (self.weight_decay, read(learning_rate))
        m, v = self._momentums[index], self._velocities[index]
        v_hat = self._velocity_hats[index] if self.amsgrad else None
        new = update_rule.adam_step(
            read(variable),
            read(_densify(gradient)),
            read(m),
            read(v),
            alpha=alpha,
            beta_1=self.beta_1,
            beta_2=self.beta_2,
            epsilon=self.epsilon,
            v_hat=None if v_hat is None else read(v_hat),
            decay=decay,
        )
        self.assign(m, new.m)
        self.assign(v, new.v)
        if v_hat is not None:
            self.assign(v_hat, new.v_hat)
        self.assign(variable, new.param)

    # -- serialization -------------------------------------------------------

    def get_config(self) -> dict:
        """The constructor arguments, for `from_config` and `.keras` files."""
        config = super().get_config()
        config.update(
            {
                "beta_1": self.beta_1,
                "beta_2": self.beta_2,
                "epsilon": self.epsilon,
                "amsgrad": self.amsgrad,
            }
        )
        return config
