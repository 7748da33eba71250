"""`keras_adam.Adam`: a drop-in for `keras.optimizers.Adam`.

This file is Keras's plumbing only: arguments, moments (slot variables),
state loading, configuration. Each step is handed, as data, to the
backend's engine (`keras_adam.backends`), which runs the math of
`keras_adam.update_rule`.
"""

from __future__ import annotations

import contextlib
import math
import re
from typing import Any

import keras
import numpy as np
from keras import ops

from keras_adam import backends, quantization, state, update_rule, validation
from keras_adam.backends.engine import KerasApply, Options, Update
from keras_adam.quantization import QuantizedMoment

#: Accepted values of `moment_dtype`.
MOMENT_DTYPES = (None, "float32", "float64", "bfloat16", "float16", "int8", "int4")

#: Types of the optimizer attributes that a compiled step bakes in.
_STATIC_TYPES = (bool, int, float, str, type(None), re.Pattern)


def _path_pattern(path: str) -> str:
    """A pattern for one variable's path, with the model's scope optional."""
    scope, _, rest = path.partition("/")
    if not rest:
        return f"^{re.escape(path)}$"
    return f"^(?:{re.escape(scope)}/)?{re.escape(rest)}$"


def _compile(patterns: tuple[str, ...]) -> re.Pattern | None:
    return re.compile("|".join(f"(?:{p})" for p in patterns)) if patterns else None


@keras.saving.register_keras_serializable(package="keras_adam")
class Adam(keras.optimizers.Optimizer):
    r"""Adam (Kingma & Ba, 2014), a drop-in for `keras.optimizers.Adam`.

    With Keras's arguments it follows `keras.optimizers.Adam`'s trajectory,
    and its state (`momentum`, `velocity` and, with AMSGrad,
    `velocity_hat`, created in the same order) moves between the two. Each
    step is

    $$
    m_t = \beta_1 m_{t-1} + (1-\beta_1) g_t, \quad
    v_t = \beta_2 v_{t-1} + (1-\beta_2) g_t^2, \quad
    \theta_t = \theta_{t-1} - \eta\,\frac{\sqrt{1-\beta_2^t}}{1-\beta_1^t}
        \cdot \frac{m_t}{\sqrt{v_t} + \hat\epsilon}
    $$

    with Keras's $\hat\epsilon$ (`epsilon_mode="paper"` for PyTorch's and
    Optax's ε). The math and the variants are on the
    [algorithm page](../algorithm.md); what runs on each backend on the
    [backends page](../backends.md); where this class is more exact than
    Keras's (bfloat16 steps in float32, float64 hyperparameters, state
    that never loads silently wrong) on the [migrating page](../migrating.md).

    Example:
        >>> import keras, keras_adam
        >>> model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(1)])
        >>> model.compile(optimizer=keras_adam.Adam(learning_rate=1e-3), loss="mse")

    Args:
        learning_rate: $\eta$: a float > 0, a
            `keras.optimizers.schedules.LearningRateSchedule`, or a callable
            returning it. Defaults to 0.001.
        beta_1: Decay rate $\beta_1 \in [0, 1)$ of the first moment.
        beta_2: Decay rate $\beta_2 \in [0, 1)$ of the second moment.
        epsilon: $\hat\epsilon \ge 0$ (or $\epsilon$, see `epsilon_mode`).
            Defaults to 1e-7.
        amsgrad: AMSGrad (Reddi et al., 2018): the denominator uses the
            running maximum of $v_t$.
        weight_decay: $\lambda \ge 0$, decoupled or L2 by
            `decoupled_weight_decay`. Defaults to None (no decay).
        clipnorm: Clip each gradient to this L2 norm.
        clipvalue: Clip each gradient elementwise to [-clipvalue, clipvalue].
        global_clipnorm: Clip all gradients together to this global L2
            norm. At most one of the three clippings may be set.
        use_ema: Keep an exponential moving average of the weights.
        ema_momentum: Momentum of that average, in [0, 1].
        ema_overwrite_frequency: Overwrite the weights with their average
            every this many steps.
        loss_scale_factor: Multiply the loss by it and divide the gradients
            by it.
        gradient_accumulation_steps: Average the gradients over this many
            calls (an integer >= 2) before one update.
        name: Name of the optimizer (the name scope of its variables).
        epsilon_mode: "hat" (Keras's placement, before bias correction) or
            "paper" (Algorithm 1's, as PyTorch and Optax).
        decoupled_weight_decay: True: AdamW's decay (Keras,
            `torch.optim.AdamW`); False: L2 added to the gradient
            (`torch.optim.Adam(weight_decay=λ)`).
        exclude_from_weight_decay: Regular expressions; a variable whose
            name or path matches one gets no decay. Kept in `get_config`.
        rectify: RAdam (Liu et al., 2019), as `torch.optim.RAdam`. Not with
            `amsgrad`.
        maximize: Climb the objective instead of descending it.
        lazy_sparse: For `tf.IndexedSlices` gradients (Embedding layers on
            TensorFlow), update only the rows they touch, as
            `torch.optim.SparseAdam`. Other backends have no row gradients
            and accept it unchanged.
        moment_dtype: dtype of $m$ and $v$: None (the variable's, as Keras),
            "float32", "float64", "bfloat16" or "float16"; or "int8" / "int4"
            for block-wise quantized moments, about 2 or 1 bytes of state
            per value instead of 8 (variables under 4096 values keep float32
            moments, and so do embedding tables unless
            `quantize_embeddings`). See the [memory page](../memory.md).
        quantize_embeddings: With a quantized `moment_dtype`, quantize the
            moments of embedding tables too (variables named "embeddings",
            as `keras.layers.Embedding` names its table). Off by default:
            rows that a batch rarely touches share a block scale with rows
            it touches often, and on an embedding recommender quantized
            tables ran ahead of float32 Adam early and behind it at the end
            (int4 by about three times the spread of reseeding, int8 within
            it): see the [memory page](../memory.md#embedding-tables).
        fused: None: each backend's fused path wherever it applies; True:
            demand it (`ValueError` where options or a variable rule it
            out); False: the `keras.ops` reference path, bit-identical to
            Keras's. See the [backends page](../backends.md).
        skip_nonfinite: Skip, as a whole, a step whose gradients hold a NaN
            or an infinity, and count it in `skipped_steps`. See the
            [backends page](../backends.md#skipping-non-finite-steps).
        **kwargs: Passed to `keras.optimizers.Optimizer`.
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
        epsilon_mode: str = "hat",
        decoupled_weight_decay: bool = True,
        exclude_from_weight_decay: list[str] | tuple[str, ...] | str | None = None,
        rectify: bool = False,
        maximize: bool = False,
        lazy_sparse: bool = False,
        moment_dtype: str | None = None,
        quantize_embeddings: bool = False,
        fused: bool | None = None,
        skip_nonfinite: bool = False,
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
        ema_overwrite_frequency = validation.integer(
            "ema_overwrite_frequency", ema_overwrite_frequency, 1, optional=True
        )
        loss_scale_factor = validation.positive(
            "loss_scale_factor", loss_scale_factor, optional=True
        )
        gradient_accumulation_steps = validation.integer(
            "gradient_accumulation_steps", gradient_accumulation_steps, 2, optional=True
        )
        name = validation.name(name)
        epsilon_mode = validation.choice("epsilon_mode", epsilon_mode, update_rule.EPSILON_MODES)
        decoupled_weight_decay = validation.boolean(
            "decoupled_weight_decay", decoupled_weight_decay
        )
        exclusions = validation.patterns("exclude_from_weight_decay", exclude_from_weight_decay)
        rectify = validation.boolean("rectify", rectify)
        maximize = validation.boolean("maximize", maximize)
        lazy_sparse = validation.boolean("lazy_sparse", lazy_sparse)
        moment_dtype = validation.choice("moment_dtype", moment_dtype, MOMENT_DTYPES)
        quantize_embeddings = validation.boolean("quantize_embeddings", quantize_embeddings)
        if quantize_embeddings and not quantization.is_quantized(moment_dtype):
            raise ValueError(
                "Argument `quantize_embeddings=True` needs a quantized `moment_dtype` "
                f"({' or '.join(repr(d) for d in quantization.QUANTIZED_DTYPES)}). "
                f"Received: quantize_embeddings={quantize_embeddings!r}, "
                f"moment_dtype={moment_dtype!r}"
            )
        if fused is not None:
            fused = validation.boolean("fused", fused)
        skip_nonfinite = validation.boolean("skip_nonfinite", skip_nonfinite)
        if quantization.is_quantized(moment_dtype) and lazy_sparse:
            raise ValueError(
                "Arguments `lazy_sparse=True` and `moment_dtype` "
                f"{moment_dtype!r} cannot be combined: a row of a quantized moment "
                "shares its block scale with other rows, so rows cannot be updated "
                f"alone. Received: lazy_sparse={lazy_sparse!r}, moment_dtype={moment_dtype!r}"
            )
        if rectify and amsgrad:
            raise ValueError(
                "Arguments `rectify` and `amsgrad` cannot both be True: RAdam has no "
                "AMSGrad variant (torch.optim.RAdam has none either). "
                f"Received: rectify={rectify!r}, amsgrad={amsgrad!r}"
            )
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
        self.epsilon_mode = epsilon_mode
        self.decoupled_weight_decay = decoupled_weight_decay
        self.rectify = rectify
        self.maximize = maximize
        self.lazy_sparse = lazy_sparse
        self.moment_dtype = moment_dtype
        self.quantize_embeddings = quantize_embeddings
        self.fused = fused
        self.skip_nonfinite = skip_nonfinite
        self._skipped_steps: keras.Variable | None = None
        # How steps run on this backend (`keras_adam.backends`).
        self._engine = backends.engine()
        if fused and quantization.is_quantized(moment_dtype):
            raise ValueError(
                f"Arguments `fused=True` and `moment_dtype={moment_dtype!r}` cannot be "
                "combined: quantized moments take their own path (a C++ kernel on "
                "TensorFlow and PyTorch, else `keras.ops`), not the float fused "
                "kernels. Use fused=None: variables with float moments still take "
                "the fused path. "
                f"Received: fused={fused!r}, moment_dtype={moment_dtype!r}"
            )
        if fused:
            blockers = self._engine.fused_blockers(self._options())
            if blockers:
                raise ValueError(
                    f"Argument `fused=True` cannot apply on the {self._engine.backend} "
                    f"backend: its fused path does not support {'; '.join(blockers)}. "
                    "Use fused=None to fall back where it cannot apply."
                )
        self._constructor_exclusions = exclusions
        self._method_exclusions: tuple[str, ...] = ()
        self._exclusion_regex = _compile(exclusions)
        # State loaded before `build` (arrays, layout), restored by `build`
        # (a tuple: not tracked).
        self._pending_state: tuple | None = None

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
        with self._engine.build_scope():
            self._build(var_list)

    def _build(self, var_list: list) -> None:
        """`build`'s work, in the engine's `build_scope`."""
        self._engine.check_build(var_list, self._options())
        super().build(var_list)
        self._momentums, self._velocities = self._add_moments(var_list, ["momentum", "velocity"])
        if self.amsgrad:
            (self._velocity_hats,) = self._add_moments(var_list, ["velocity_hat"])
        if self.skip_nonfinite:
            # Last, so that the variables before it are laid out as Keras's.
            self._skipped_steps = self.add_variable(
                shape=(),
                dtype="int",
                initializer="zeros",
                aggregation="only_first_replica",
                name="skipped_steps",
            )
        pending, self._pending_state = self._pending_state, None
        if pending is not None:
            # `fit` may build inside a traced function: restore eagerly, once.
            arrays, record = pending
            store: dict[str, Any] = {str(i): value for i, value in enumerate(arrays)}
            if record is not None:
                store[state.LAYOUT_KEY] = state.encode_layout(record)
            with self._engine.restore_scope():
                self.load_own_variables(store)

    def _add_moments(self, var_list: list, names: list[str]) -> tuple[list, ...]:
        """Slot variables named and ordered as Keras's, of `moment_dtype`.

        Quantized moments (`moment_dtype` "int8" or "int4") are
        `QuantizedMoment`s of one uint8 variable each, `<name>_quantized`
        (scales and codes); only variables of at least
        `quantization.MIN_QUANTIZED_SIZE` values get them.
        """
        if self.moment_dtype is None:
            return tuple(self.add_optimizer_variables(var_list, names))
        slots: tuple[list, ...] = tuple([] for _ in names)
        for variable in var_list:
            for slot_list, name in zip(slots, names, strict=True):
                if self._overwrite_variable_with_gradient(variable):
                    slot_list.append(None)
                else:
                    slot_list.append(self._add_moment(variable, name))
        return slots

    def _add_moment(self, reference: Any, name: str) -> keras.Variable | QuantizedMoment:
        # Keras's own naming ("dense_kernel_momentum") and, under
        # tf.distribute, colocation with the model variable.
        signed = name == "momentum"  # m is signed; v and v̂ are not
        name = f"{reference.path.replace('/', '_')}_{name}"
        strategy = getattr(self, "_distribution_strategy", None)
        scope = (
            strategy.extended.colocate_vars_with(reference.value)
            if strategy
            else contextlib.nullcontext()
        )
        storage = self._options().moment_storage(reference)
        with scope:
            if storage not in quantization.QUANTIZED_DTYPES:
                return self.add_variable(
                    shape=reference.shape,
                    dtype=storage,
                    name=name,
                    layout=getattr(reference, "_layout", None),
                )
            m_format, v_format = quantization.formats(storage)
            fmt = m_format if signed else v_format
            # All-zero scales and codes decode to zeros: Adam's initial state.
            stored = self.add_variable(
                shape=(fmt.storage_bytes(math.prod(reference.shape)),),
                dtype="uint8",
                name=name + state.QUANTIZED_SUFFIX,
            )
        return QuantizedMoment(stored, tuple(reference.shape), fmt)

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

        Full state loaded into an optimizer that is not built yet (as
        `model.load_weights` does before the first `fit`) is kept and
        restored by `build`: the step counter and learning rate at once, the
        moments when their variables exist. `keras.optimizers.Adam` instead
        skips it with a warning, restarting Adam from zero moments and step 1.

        Quantized state (`moment_dtype` "int8" or "int4") loads only into an
        optimizer of the same `moment_dtype`, for a model whose variables
        have the saved names and shapes; float state never loads into a
        quantized optimizer, nor the reverse (`keras_adam.transfer_state`
        converts between them).

        Args:
            store: A mapping from "0", "1", ... to arrays (and, for quantized
                state, `keras_adam.state.LAYOUT_KEY` to its layout).

        Raises:
            ValueError: if the number of saved arrays, any shape, or the
                quantized layout does not fit this optimizer's variables (for
                deferred state, raised by `build`).
        """
        own = self.variables
        saved = state.saved_arrays(store)
        record = state.decode_layout(store)
        base = self._base_variable_count()
        if not self.built and len(saved) > base:
            self._check_shapes(own, saved[:base])
            for variable, value in zip(own, saved[:base], strict=True):
                variable.assign(value)
            self._pending_state = (tuple(saved), record)
            return
        if len(saved) == base and self.built and record is None:
            # State saved before the saving optimizer was built: zero moments.
            self._check_shapes(own, saved)
            for variable, value in zip(own, saved, strict=False):
                variable.assign(value)
            for variable in own[len(saved) :]:
                variable.assign(ops.zeros(variable.shape, dtype=variable.dtype))
            return
        state.check_layout(self, record, saved)
        if len(saved) != len(own):
            # Keras's state (or ours without skip_nonfinite): no skip counter.
            without_counter = self.skip_nonfinite and self.built and len(saved) == len(own) - 1
            if not without_counter:
                raise ValueError(
                    f"Cannot load optimizer state into '{self.name}': the saved state "
                    f"has {len(saved)} variables but this optimizer has {len(own)}. "
                    "Was the state saved with other options (amsgrad, skip_nonfinite, use_ema, "
                    "gradient_accumulation_steps, a learning-rate schedule) or for "
                    "another model?"
                )
        self._check_shapes(own, saved)
        for variable, value in zip(own, saved, strict=False):
            variable.assign(value)
        for variable in own[len(saved) :]:
            variable.assign(ops.zeros(variable.shape, dtype=variable.dtype))

    def _check_shapes(self, own: list, saved: list) -> None:
        for i, (variable, value) in enumerate(zip(own, saved, strict=False)):
            if tuple(variable.shape) != tuple(value.shape):
                raise ValueError(
                    f"Cannot load optimizer state into '{self.name}': saved variable {i} "
                    f"has shape {tuple(value.shape)} but '{variable.path}' has shape "
                    f"{tuple(variable.shape)}."
                )

    def save_own_variables(self, store: Any) -> None:
        """Save the optimizer's variables; deferred state not yet restored is saved as is.

        Quantized state also saves its layout (`keras_adam.state`): names,
        shapes and format, checked by `load_own_variables`.
        """
        if not self.built and self._pending_state is not None:
            arrays, record = self._pending_state
            for i, value in enumerate(arrays):
                store[str(i)] = value
            if record is not None:
                store[state.LAYOUT_KEY] = state.encode_layout(record)
            return
        super().save_own_variables(store)
        if quantization.is_quantized(self.moment_dtype) and self.built:
            store[state.LAYOUT_KEY] = state.encode_layout(state.layout(self))

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

    def read_moments(self, variable: Any) -> dict[str, np.ndarray]:
        """The moments of one model variable as NumPy arrays, quantized ones decoded.

        Args:
            variable: A model variable this optimizer updates.

        Returns:
            "momentum" and "velocity" (and "velocity_hat" with AMSGrad),
            arrays of the variable's shape.
        """
        return state.read_moments(self, variable)

    # -- the step ------------------------------------------------------------

    def exclude_from_weight_decay(
        self, var_list: list | None = None, var_names: list[str] | None = None
    ) -> None:
        """Exclude variables from weight decay (before the optimizer is built).

        As in Keras, each call replaces the previous call's exclusions.
        Unlike Keras, they are kept in `get_config` (so in `.keras` files):
        `var_names` as patterns, and each variable of `var_list` as a pattern
        of its path ("net/dense/bias" becomes `^(?:net/)?dense/bias$`: Keras
        drops the model's name from paths when it reloads a model). The
        constructor's `exclude_from_weight_decay` patterns stay in force.

        Args:
            var_list: Variables to exclude.
            var_names: Regular expressions; a variable whose name or path
                matches any of them is excluded.
        """
        super().exclude_from_weight_decay(var_list=var_list, var_names=var_names)
        names = validation.patterns("var_names", var_names)
        paths = tuple(_path_pattern(v.path) for v in var_list or () if hasattr(v, "path"))
        self._method_exclusions = names + paths
        self._exclusion_regex = _compile(self._constructor_exclusions + self._method_exclusions)

    def _use_weight_decay(self, variable: Any) -> bool:
        if not super()._use_weight_decay(variable):
            return False
        if self._exclusion_regex is None:
            return True
        model_variable = self._trainable_variables[self._get_variable_index(variable)]
        return not any(
            self._exclusion_regex.search(text)
            for text in (model_variable.name, getattr(model_variable, "path", ""))
        )

    def _apply_weight_decay(self, variables: list) -> None:
        # Weight decay (decoupled or L2) is part of `update_step`, computed
        # in the step's precision; Keras's separate pass is not used.
        return

    # -- skipping non-finite steps --------------------------------------------

    @property
    def skipped_steps(self) -> keras.Variable | None:
        """How many steps `skip_nonfinite=True` skipped (an integer variable).

        int64 on TensorFlow, int32 elsewhere (the dtype of Keras's own step
        counter `iterations` on each backend).

        None with `skip_nonfinite=False`, and before the optimizer is built.
        It is saved with the optimizer's state.
        """
        return self._skipped_steps

    def apply(self, grads: list, trainable_variables: list | None = None) -> None:
        """Apply one step of gradients (see `keras.optimizers.Optimizer.apply`).

        With `skip_nonfinite=True` the whole step takes effect only if every
        gradient is finite; otherwise `skipped_steps` grows by one and
        nothing else changes.

        Args:
            grads: One gradient (or None) per variable.
            trainable_variables: The variables; needed on the first call,
                which builds the optimizer.
        """
        run = super().apply
        grads = list(grads)
        if trainable_variables is not None:
            trainable_variables = list(trainable_variables)
        step = KerasApply(run, grads, trainable_variables, self._state, self._trace_key)
        if not self.skip_nonfinite:
            return self._engine.apply(step)
        if not grads:
            return None
        if trainable_variables is not None:
            if not self.built:
                # Variables cannot be created inside a branch of a condition.
                with keras.name_scope(self.name, caller=self):
                    self.build(trainable_variables)
        elif not self.built:
            return run(grads, trainable_variables)  # Keras's error for this case
        self._engine.apply_skipping_nonfinite(step, self._skipped_steps)
        return None

    def _backend_update_step(self, grads: list, trainable_variables: list, learning_rate: Any):
        # Keras's hook for the step of all variables: the engine's.
        self._engine.update(self._update(grads, trainable_variables, learning_rate))

    def update_step(self, gradient: Any, variable: Any, learning_rate: Any) -> None:
        """Apply one step to one variable (Keras's per-variable hook).

        Args:
            gradient: The (clipped, unscaled) gradient, dense or sparse.
            variable: The model variable.
            learning_rate: The current learning rate.
        """
        self._engine.update(self._update([gradient], [variable], learning_rate))

    # -- what the engine is given ----------------------------------------------

    def _options(self) -> Options:
        """The arguments that decide how a step runs, as the engine takes them."""
        hyper = update_rule.Hyperparameters(
            beta_1=self.beta_1,
            beta_2=self.beta_2,
            epsilon=self.epsilon,
            weight_decay=self.weight_decay or 0.0,
            decoupled_weight_decay=self.decoupled_weight_decay,
            epsilon_mode=self.epsilon_mode,
            amsgrad=self.amsgrad,
            rectify=self.rectify,
            maximize=self.maximize,
        )
        return Options(
            hyper, self.fused, self.moment_dtype, self.lazy_sparse, self.quantize_embeddings
        )

    def _update(self, grads: list, variables: list, learning_rate: Any) -> Update:
        """One step of `variables`, as the engine takes it."""
        return Update(
            grads=grads,
            variables=variables,
            slots=self._slots,
            decays=self._use_weight_decay,
            iterations=self.iterations,
            learning_rate=learning_rate,
            options=self._options(),
        )

    def _slots(self, variable: Any) -> list:
        """`[m, v]`, and with AMSGrad `[m, v, v_hat]`, of `variable`."""
        return state.moment_slots(self, self._get_variable_index(variable))

    def _state(self) -> list:
        """Every variable a step may write: the model's trainable ones, then ours.

        Without the `skipped_steps` counter, which only a skip writes.
        """
        own = [v for v in self.variables if v is not self._skipped_steps]
        return [*self._trainable_variables, *own]

    def _trace_key(self) -> tuple | None:
        """What a compiled step bakes in besides shapes; None where it may not compile.

        A step may not be compiled before `build` (it creates variables), with
        `fused=False`, or with a plain callable learning rate (it may read
        state a trace would freeze).
        """
        learning_rate = self._learning_rate
        schedule = keras.optimizers.schedules.LearningRateSchedule
        if (
            self.fused is False
            or not self.built
            or (callable(learning_rate) and not isinstance(learning_rate, schedule))
        ):
            return None
        return (
            tuple((k, v) for k, v in vars(self).items() if isinstance(v, _STATIC_TYPES)),
            keras.config.floatx(),
        )

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
                "epsilon_mode": self.epsilon_mode,
                "decoupled_weight_decay": self.decoupled_weight_decay,
                "exclude_from_weight_decay": (
                    list(self._constructor_exclusions + self._method_exclusions) or None
                ),
                "rectify": self.rectify,
                "maximize": self.maximize,
                "lazy_sparse": self.lazy_sparse,
                "moment_dtype": self.moment_dtype,
                "quantize_embeddings": self.quantize_embeddings,
                "fused": self.fused,
                "skip_nonfinite": self.skip_nonfinite,
            }
        )
        return config
