"""`keras_adam.Adam`: a drop-in for `keras.optimizers.Adam`.

The math of a step is in `keras_adam.update_rule`; how a step runs on each
Keras backend is in `keras_adam.backends`; this file wires them into Keras's
optimizer plumbing (arguments, slot variables, state, serialization).
"""

from __future__ import annotations

import contextlib
import re
from typing import Any

import keras
import numpy as np
from keras import backend, ops

from keras_adam import backends, update_rule, validation

#: Accepted values of `moment_dtype`.
MOMENT_DTYPES = (None, "float32", "float64", "bfloat16", "float16")


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
        weight_decay: Weight decay $\lambda \ge 0$, decoupled or L2 by
            `decoupled_weight_decay`. Defaults to None (no decay).
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
        epsilon_mode: "hat" (default): `epsilon` is Keras's $\hat\epsilon$,
            added to $\sqrt{v_t}$ before bias correction. "paper": `epsilon`
            is Algorithm 1's $\epsilon$, added to $\sqrt{\hat v_t}$, as in
            PyTorch and Optax. They agree when
            $\epsilon_t = \hat\epsilon/\sqrt{1-\beta_2^t}$.
        decoupled_weight_decay: True (default): AdamW's
            $\theta \leftarrow \theta - \eta\lambda\theta$ (Keras,
            `torch.optim.AdamW`). False: L2, $g \leftarrow g + \lambda\theta$
            (`torch.optim.Adam(weight_decay=λ)`).
        exclude_from_weight_decay: Regular expressions; a variable whose name
            or path (e.g. "model/dense/bias") matches any of them gets no
            weight decay. Keras drops the model's name from paths when it
            reloads a model, so anchor on layer names: `"(^|/)dense/"`.
            Kept in `get_config` and `.keras` files, together with what is
            passed to the `exclude_from_weight_decay()` method.
        rectify: RAdam (Liu et al., 2019), as `torch.optim.RAdam`: plain
            momentum SGD while the variance estimate is intractable
            ($\rho_t \le 5$), then a rectified adaptive step. Not with
            `amsgrad`.
        maximize: Climb the objective instead of descending it ($g \to -g$).
        lazy_sparse: For `tf.IndexedSlices` gradients (Embedding layers),
            update only the rows the gradient touches: their moments, their
            weights and, lazily, their weight decay. Untouched rows stay
            bit-identical, as in `torch.optim.SparseAdam` and TFA's
            `LazyAdam`. Repeated indices are summed first. Where the fused
            path applies (see `fused`), outside XLA on CPU, one op
            (`KerasAdamSparseApplyAdam`) does the whole update at a cost in
            proportion to the rows touched; elsewhere, gathers and scatters
            of `keras.ops`. With False (default), sparse gradients give
            exactly the dense result. Only TensorFlow has sparse gradients:
            on JAX and PyTorch every gradient is dense, so the option is
            accepted (a configuration saved on TensorFlow loads anywhere),
            changes nothing, and `build` warns once, naming the backend.
        moment_dtype: dtype of $m$ and $v$: None (the variable's dtype, as
            Keras), "float32", "float64", "bfloat16" or "float16". With
            "float32", bfloat16/float16 weights keep float32 moments.
        fused: Which execution path takes dense gradients (each backend's
            engine is in `keras_adam.backends`). None (default): the fused
            path wherever it applies, the `keras.ops` path elsewhere. On
            TensorFlow the fused path is a multi-tensor op that updates all
            float32 (and all float64) variables of a step in one pass per
            element (`keras_adam.kernels`, compiled at first use;
            `KERAS_ADAM_KERNEL=0` disables it; it takes 1 − β computed
            as Keras does, so it gives `keras.optimizers.Adam`'s numbers),
            and under XLA and where that op is unavailable the `keras.ops`
            step, which XLA fuses; on PyTorch, torch's fused Adam
            kernels (`torch._fused_adam_`, `torch._fused_adamw_`), one call
            per device and dtype; on JAX, XLA: under `jax.jit` the step is
            part of the caller's program, and an eager `apply` runs as one
            cached jitted program. True: demand the fused path; raises `ValueError` if the
            options or a variable rule it out on this backend (on
            TensorFlow `epsilon_mode="paper"`, `amsgrad`, `rectify`, dtypes
            other than float32/float64 or moments of another dtype; on
            PyTorch `rectify` and those dtypes). False: always the
            `keras.ops` path, the reference that is bit-identical to
            `keras.optimizers.Adam`'s generic step. All paths agree to
            round-off.
        skip_nonfinite: If True, a step whose gradients hold any NaN or
            infinity is skipped as a whole: weights, moments, the step
            counter `iterations` (so bias correction), gradient accumulators
            and the weight average stay untouched, and `skipped_steps`
            counts the skip. The check reads the gradients before
            unscaling and clipping; under tf.distribute it sums the verdicts
            of all replicas (and workers), so every replica skips the same
            steps. It works eagerly and compiled on every backend: on
            TensorFlow the step runs under `tf.cond` (inside `tf.function`,
            under XLA and tf.distribute); on JAX every variable selects its
            new or old value (no branch assigns state, so it compiles under
            `jax.jit`); on PyTorch the verdict is read on the host. False
            (default) is Keras's behaviour: no check, and a NaN or infinite
            gradient propagates into the moments and the weights. With
            True, `variables` ends with the counter (one more than
            `keras.optimizers.Adam`'s); this class still loads Keras's
            state (the counter then starts at 0).
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
        epsilon_mode: str = "hat",
        decoupled_weight_decay: bool = True,
        exclude_from_weight_decay: list[str] | tuple[str, ...] | str | None = None,
        rectify: bool = False,
        maximize: bool = False,
        lazy_sparse: bool = False,
        moment_dtype: str | None = None,
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
        if fused is not None:
            fused = validation.boolean("fused", fused)
        skip_nonfinite = validation.boolean("skip_nonfinite", skip_nonfinite)
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
        self.fused = fused
        self.skip_nonfinite = skip_nonfinite
        self._skipped_steps: keras.Variable | None = None
        # How steps run on this backend (`keras_adam.backends`).
        self._engine = backends.engine(self)
        if fused:
            blockers = self._engine.fused_flag_blockers()
            if blockers:
                raise ValueError(
                    f"Argument `fused=True` cannot apply on the {backend.backend()} "
                    f"backend: its fused path does not support {'; '.join(blockers)}. "
                    "Use fused=None to fall back where it cannot apply."
                )
        self._constructor_exclusions = exclusions
        self._method_exclusions: tuple[str, ...] = ()
        self._exclusion_regex = _compile(exclusions)
        # State loaded before `build`, restored by `build` (a tuple: not tracked).
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
        self._engine.check_build(var_list)
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
            with self._engine.restore_scope():
                self.load_own_variables({str(i): value for i, value in enumerate(pending)})

    def _add_moments(self, var_list: list, names: list[str]) -> tuple[list, ...]:
        """Slot variables named and ordered as Keras's, of `moment_dtype`."""
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

    def _add_moment(self, reference: Any, name: str) -> keras.Variable:
        # Keras's own naming ("dense_kernel_momentum") and, under
        # tf.distribute, colocation with the model variable.
        name = f"{reference.path.replace('/', '_')}_{name}"
        strategy = getattr(self, "_distribution_strategy", None)
        scope = (
            strategy.extended.colocate_vars_with(reference.value)
            if strategy
            else contextlib.nullcontext()
        )
        with scope:
            return self.add_variable(
                shape=reference.shape,
                dtype=self.moment_dtype,
                name=name,
                layout=getattr(reference, "_layout", None),
            )

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

        Args:
            store: A mapping from "0", "1", ... to arrays.

        Raises:
            ValueError: if the number of saved arrays or any shape does not
                fit this optimizer's variables (for deferred state, raised by
                `build`).
        """
        own = self.variables
        saved = [np.array(store[str(i)]) for i in range(len(store.keys()))]
        base = self._base_variable_count()
        if not self.built and len(saved) > base:
            self._check_shapes(own, saved[:base])
            for variable, value in zip(own, saved[:base], strict=True):
                variable.assign(value)
            self._pending_state = tuple(saved)
            return
        if len(saved) != len(own):
            unbuilt_state = len(saved) == base and self.built
            # Keras's state (or ours without skip_nonfinite): no skip counter.
            without_counter = self.skip_nonfinite and self.built and len(saved) == len(own) - 1
            if not (unbuilt_state or without_counter):
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
        """Save the optimizer's variables; deferred state not yet restored is saved as is."""
        if not self.built and self._pending_state is not None:
            for i, value in enumerate(self._pending_state):
                store[str(i)] = value
            return
        super().save_own_variables(store)

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
        nothing else changes (how, is the backend engine's
        `apply_skipping_nonfinite`).

        Args:
            grads: One gradient (or None) per variable.
            trainable_variables: The variables; needed on the first call,
                which builds the optimizer.
        """
        apply = super().apply
        if not self.skip_nonfinite:
            return self._engine.apply(apply, grads, trainable_variables)
        grads = list(grads)
        if not grads:
            return None
        if trainable_variables is not None:
            trainable_variables = list(trainable_variables)
            if not self.built:
                # Variables cannot be created inside a branch of a condition.
                with keras.name_scope(self.name, caller=self):
                    self.build(trainable_variables)
        elif not self.built:
            return apply(grads, trainable_variables)  # Keras's error for this case
        self._engine.apply_skipping_nonfinite(apply, grads, trainable_variables)
        return None

    def update_step(self, gradient: Any, variable: Any, learning_rate: Any) -> None:
        """Apply one step to `variable` (the math is `update_rule.adam_step`).

        The backend's engine (`keras_adam.backends`) chooses the path: a
        fused kernel, lazy sparse rows, or `_reference_update`.

        Args:
            gradient: The (clipped, unscaled) gradient, dense or sparse.
            variable: The model variable.
            learning_rate: The current learning rate.
        """
        slots = self._slots(variable)
        self._engine.update_variable(
            gradient, variable, slots, self._hyperparameters(variable, learning_rate)
        )

    def _slots(self, variable: Any) -> list:
        """`[m, v]`, and with AMSGrad `[m, v, v_hat]`, of `variable`."""
        index = self._get_variable_index(variable)
        slots = [self._momentums[index], self._velocities[index]]
        if self.amsgrad:
            slots.append(self._velocity_hats[index])
        return slots

    def _hyperparameters(self, variable: Any, learning_rate: Any) -> dict:
        """The keyword arguments of `update_rule.adam_step` for `variable`."""
        decays = self.weight_decay and self._use_weight_decay(variable)
        return dict(
            learning_rate=learning_rate,
            beta_1=self.beta_1,
            beta_2=self.beta_2,
            epsilon=self.epsilon,
            weight_decay=self.weight_decay if decays else 0.0,
            decoupled_weight_decay=self.decoupled_weight_decay,
            epsilon_mode=self.epsilon_mode,
            rectify=self.rectify,
            maximize=self.maximize,
        )

    def _compute_dtype(self, variable: Any, slots: list) -> str:
        """The dtype the step of `variable` is computed in (`update_rule.compute_dtype`)."""
        return update_rule.compute_dtype(
            *(backend.standardize_dtype(x.dtype) for x in [variable, *slots])
        )

    def _reference_update(self, gradient: Any, variable: Any, slots: list, hyper: dict) -> None:
        """The `keras.ops` path: `update_rule.adam_step` on the whole variable.

        Bit-identical to `keras.optimizers.Adam`'s own `keras.ops` step
        where the options are Keras's; it runs, and compiles, on every
        backend.
        """
        dtype = self._compute_dtype(variable, slots)

        def read(x: Any) -> Any:
            return ops.cast(x, dtype)

        new = update_rule.adam_step(
            read(variable),
            read(gradient),
            *(read(slot) for slot in slots[:2]),
            v_hat=read(slots[2]) if self.amsgrad else None,
            step=self.iterations + 1,
            **hyper,
        )
        for slot, value in zip(slots, new[1:], strict=False):
            self.assign(slot, value)
        self.assign(variable, new.param)

    def _backend_update_step(self, grads: list, trainable_variables: list, learning_rate: Any):
        # One step of all variables, grouped as the backend's engine runs them.
        self._engine.update_all(
            grads, trainable_variables, learning_rate, super()._backend_update_step
        )

    def _all_reduce_sum_gradients(self, grads_and_vars: list) -> list:
        # Called by the TensorFlow backend's `_backend_update_step` only.
        return self._engine.all_reduce_sum_gradients(
            grads_and_vars, super()._all_reduce_sum_gradients
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
                "fused": self.fused,
                "skip_nonfinite": self.skip_nonfinite,
            }
        )
        return config
