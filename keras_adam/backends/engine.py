"""The engine: how the steps of one `keras_adam.Adam` run on one backend.

`keras_adam.adam` is Keras's plumbing; it hands each step to its engine as
data (an `Update`: gradients, variables, their moments, the step counter,
the learning rate and the optimizer's `Options`) and never does arithmetic
itself. The engine builds the step's `update_rule.StepScalars` (once per
compute dtype for a fused path, per variable for the reference path, see
`ScalarsCache`) and runs each variable through one of its paths. Every path
has one signature, `(params, grads, ms, vs, v_hats, scalars)` for a group of
variables that share a compute dtype and hyperparameters, like
`torch.optim.adam`'s `_single_tensor_adam` / `_multi_tensor_adam` /
`_fused_adam`:

- `Engine.reference`: `update_rule.adam_step` in `keras.ops`, one variable
  at a time; every backend, every option.
- The backends' fused paths (`TensorFlowEngine.multi_tensor` and
  `sparse_rows`, `TorchEngine.fused`).

`Engine` is the generic engine (the reference path only) and declares every
hook a backend may override; each backend module subclasses it. Calls run
one way: `adam.py` → engine → `update_rule` or kernels.
"""

from __future__ import annotations

import contextlib
import dataclasses
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import keras
from keras import backend, ops

from keras_adam import quantization, update_rule
from keras_adam.quantization import QuantizedMoment
from keras_adam.update_rule import Hyperparameters, StepScalars


@dataclasses.dataclass(frozen=True)
class Options:
    """What the optimizer's arguments ask of its engine.

    Attributes:
        hyper: The math's hyperparameters and flags (weight decay is the
            optimizer's λ; a variable excluded from it gets 0).
        fused: None (the fused path where it applies), True (demanded) or
            False (the reference path only).
        moment_dtype: dtype of the moments, or None for the variable's;
            "int8" or "int4" for quantized moments (`moment_storage`).
        lazy_sparse: Update only the rows a sparse gradient touches.
        quantize_embeddings: Quantize embedding tables' moments too.
    """

    hyper: Hyperparameters
    fused: bool | None = None
    moment_dtype: str | None = None
    lazy_sparse: bool = False
    quantize_embeddings: bool = False

    def moment_storage(self, variable: Any) -> str | None:
        """How the moments of `variable` are stored (`quantization.storage`)."""
        return quantization.storage(self.moment_dtype, variable, self.quantize_embeddings)


@dataclasses.dataclass(frozen=True)
class Update:
    r"""One step of some variables, as the optimizer hands it to its engine.

    Attributes:
        grads: One gradient per variable (None: the variable is not updated).
        variables: The model variables.
        slots: The moment variables of a model variable: `[m, v]`, or
            `[m, v, v_hat]` with AMSGrad.
        decays: Whether weight decay applies to a model variable.
        iterations: The optimizer's step counter before this step (so
            $t$ = `iterations` + 1).
        learning_rate: $\eta$ for this step (a variable, tensor or float).
        options: The optimizer's options.
    """

    grads: Sequence[Any]
    variables: Sequence[Any]
    slots: Callable[[Any], list]
    decays: Callable[[Any], bool]
    iterations: Any
    learning_rate: Any
    options: Options

    def hyper(self, variable: Any) -> Hyperparameters:
        """The hyperparameters of `variable` (λ = 0 where decay does not apply)."""
        hyper = self.options.hyper
        if hyper.weight_decay and not self.decays(variable):
            return hyper.without_weight_decay()
        return hyper


@dataclasses.dataclass(frozen=True)
class KerasApply:
    """One call of Keras's `Optimizer.apply`, as the optimizer hands it to its engine.

    Attributes:
        run: Keras's `apply`, called as `run(grads, trainable_variables)`:
            unscaling, clipping, accumulation, the engine's `update`, the
            weight average and the step counter.
        grads: One gradient (or None) per variable.
        trainable_variables: The variables, or None for all.
        state: Returns every variable `run` may write: the model's trainable
            variables, then the optimizer's but the skip counter. Called
            only by engines that need it.
        trace_key: Returns what a compiled `run` bakes in besides shapes (the
            optimizer's plain attributes), or None where `run` must not be
            compiled. Called only by engines that compile.
    """

    run: Callable[[list, list | None], None]
    grads: list
    trainable_variables: list | None
    state: Callable[[], list]
    trace_key: Callable[[], tuple | None]

    def __call__(self) -> None:
        """Run Keras's `apply` on these gradients."""
        self.run(self.grads, self.trainable_variables)


class ScalarsCache:
    """The `StepScalars` of one step: `update_rule.step_scalars` called in one place.

    A fused path takes them once per step and compute dtype (`__call__`).
    The reference path builds them for each variable (`fresh`), as
    `keras.optimizers.Adam.update_step` does: under XLA and TensorFlow's
    graph optimizer, scalars shared by several variables' elementwise
    loops are fused, and rounded, differently from scalars of one loop.
    """

    def __init__(self, update: Update) -> None:
        self._update = update
        self._by_dtype: dict[str, StepScalars] = {}

    def __call__(self, dtype: str, hyper: Hyperparameters) -> StepScalars:
        """The step's scalars in `dtype` with the flags and decay of `hyper`, once per dtype."""
        scalars = self._by_dtype.get(dtype)
        if scalars is None:
            scalars = self._by_dtype[dtype] = self.fresh(dtype, self._update.options.hyper)
        return scalars.with_hyper(hyper)

    def fresh(self, dtype: str, hyper: Hyperparameters) -> StepScalars:
        """The step's scalars in `dtype` with the flags and decay of `hyper`, built anew."""
        update = self._update
        return update_rule.step_scalars(hyper, update.iterations + 1, update.learning_rate, dtype)


def compute_dtype(variable: Any, slots: Sequence[Any]) -> str:
    """The dtype the step of `variable` is computed in (`update_rule.compute_dtype`)."""
    return update_rule.compute_dtype(
        *(backend.standardize_dtype(x.dtype) for x in [variable, *slots])
    )


def quantized_kernel_scalars(scalars: StepScalars) -> Any:
    """The quantized kernels' float32 scalars, stacked (`kernels/quantized_adam.h`).

    alpha, 1 - beta1, 1 - beta2, epsilon, lambda, lr and sqrt(1 - beta2^t).
    """
    hyper = scalars.hyper
    values = (
        scalars.alpha,
        scalars.one_minus_beta_1,
        scalars.one_minus_beta_2,
        hyper.epsilon,
        hyper.weight_decay,
        scalars.learning_rate,
        scalars.bias_correction_2_sqrt,
    )
    return ops.stack([ops.cast(x, "float32") for x in values])


def quantized_kernel_flags(hyper: Hyperparameters) -> dict[str, bool]:
    """The quantized kernels' flags: maximize, l2, decoupled, amsgrad and paper.

    Weight decay is L2 or decoupled (one of the two where it is nonzero);
    with AMSGrad every variable has a v̂ (`Adam._add_moments`).
    """
    decay = bool(hyper.weight_decay)
    return {
        "maximize": bool(hyper.maximize),
        "l2": decay and not hyper.decoupled_weight_decay,
        "decoupled": decay and hyper.decoupled_weight_decay,
        "amsgrad": bool(hyper.amsgrad),
        "paper": hyper.epsilon_mode == "paper",
    }


def moments(slots: Sequence[Any]) -> tuple[Any, Any, Any]:
    """`(m, v, v_hat)` of a variable's slot list (`v_hat` None without AMSGrad)."""
    return slots[0], slots[1], slots[2] if len(slots) > 2 else None


class Engine:
    """The generic engine: every variable through the reference path.

    Backends subclass it and override the hooks they run differently. The
    hooks, in the order a step meets them:

    - construction: `fused_blockers` (and `fuses`, which reads it);
    - `build`: `check_build` (with `variable_blocker`) and `restore_scope`;
    - each step, around Keras's `apply`: `apply`, or
      `apply_skipping_nonfinite` (with `count_nonfinite` and
      `stored_values`);
    - the step of the variables, from Keras's `_backend_update_step` and
      `update_step`: `update`, which groups the variables and calls
      `update_one` or a path such as `reference`, which write with `assign`.

    Attributes:
        sparse_gradients: Whether this backend's layers produce row
            gradients (`lazy_sparse` has rows to be lazy about).
    """

    sparse_gradients = False

    @property
    def backend(self) -> str:
        """The Keras backend's name."""
        return keras.backend.backend()

    # -- which path ------------------------------------------------------------

    def fused_blockers(self, options: Options) -> list[str]:
        """Why `options` rule out the fused path on this backend (empty if none)."""
        return [f"the {self.backend} backend (it has no fused Adam kernel)"]

    def variable_blocker(self, variable: Any, options: Options) -> str | None:
        """Why `variable` cannot take the fused path (None if it can)."""
        return None

    def fuses(self, options: Options) -> bool:
        """Whether the options allow the fused path at all."""
        return options.fused is not False and not self.fused_blockers(options)

    # -- build -----------------------------------------------------------------

    def check_build(self, variables: list, options: Options) -> None:
        """Checks before the optimizer creates its moments for `variables`.

        Raises:
            ValueError: with `fused=True`, if a variable cannot take the
                fused path.
        """
        if options.fused:
            for variable in variables:
                blocker = self.variable_blocker(variable, options)
                if blocker:
                    raise ValueError(
                        f"Argument `fused=True` cannot apply to variable "
                        f"'{getattr(variable, 'path', variable.name)}': {blocker}."
                    )
        if options.lazy_sparse and not self.sparse_gradients:
            warnings.warn(
                f"keras_adam.Adam(lazy_sparse=True) on the {self.backend} backend: its "
                "gradients are always dense (Embedding layers included), so every step "
                "updates every row, exactly as with lazy_sparse=False. The option is "
                "kept so that a configuration saved on TensorFlow loads here.",
                UserWarning,
                stacklevel=4,
            )

    def restore_scope(self) -> contextlib.AbstractContextManager:
        """Where `build` restores state loaded before it (eagerly, outside traces)."""
        return contextlib.nullcontext()

    def build_scope(self) -> contextlib.AbstractContextManager:
        """Where `build` creates the optimizer's variables (see `TensorFlowEngine.build_scope`)."""
        return contextlib.nullcontext()

    # -- gradients -------------------------------------------------------------

    def stored_values(self, gradient: Any) -> Any:
        """The values a gradient stores (a sparse gradient's nonzero values)."""
        return gradient

    def count_nonfinite(self, grads: Sequence[Any]) -> Any:
        """How many of `grads` hold a NaN or an infinity (a float32 scalar).

        None entries are ignored; a sparse gradient is judged by its values.
        """
        counts = []
        for gradient in grads:
            if gradient is None:
                continue
            values = self.stored_values(gradient)
            counts.append(ops.cast(ops.logical_not(ops.all(ops.isfinite(values))), "float32"))
        return ops.sum(ops.stack(counts)) if counts else ops.zeros((), "float32")

    # -- around Keras's apply ----------------------------------------------------

    def apply(self, step: KerasApply) -> None:
        """One whole step: Keras's `apply`."""
        step()

    def apply_skipping_nonfinite(self, step: KerasApply, counter: Any) -> None:
        """Keras's `apply` if every gradient is finite, else nothing but `counter` + 1.

        Without control flow over state: the step runs, then every variable
        of `step.state()` takes its new value if every gradient was finite,
        its old value otherwise. This compiles under any tracer (`jax.jit`,
        XLA) and needs no branch that assigns variables.

        Args:
            step: The call of Keras's `apply`.
            counter: The integer variable that counts skipped steps.
        """
        finite = ops.equal(self.count_nonfinite(step.grads), 0)
        variables = step.state()
        before = [v.value for v in variables]
        step()
        for variable, old in zip(variables, before, strict=True):
            variable.assign(ops.where(finite, variable.value, old))
        counter.assign_add(ops.cast(ops.logical_not(finite), counter.dtype))

    # -- the step ----------------------------------------------------------------

    def update(self, update: Update) -> None:
        """One step of the variables of `update` (here: each on the reference path)."""
        scalars = ScalarsCache(update)
        for grad, variable in zip(update.grads, update.variables, strict=True):
            if grad is not None:
                self.update_one(grad, variable, update, scalars)

    def update_one(self, grad: Any, variable: Any, update: Update, scalars: ScalarsCache) -> None:
        """One variable on the reference path."""
        slots = update.slots(variable)
        m, v, v_hat = moments(slots)
        self.reference(
            [variable],
            [grad],
            [m],
            [v],
            [v_hat],
            scalars.fresh(compute_dtype(variable, slots), update.hyper(variable)),
        )

    def reference(
        self,
        params: list,
        grads: list,
        ms: list,
        vs: list,
        v_hats: list,
        scalars: StepScalars,
    ) -> None:
        """The reference path: `update_rule.adam_step` in `keras.ops`, per variable.

        Bit-identical to `keras.optimizers.Adam`'s `keras.ops` step where the
        options are Keras's; it runs, and compiles, on every backend.
        Variables of another dtype (bfloat16, float16) are computed in
        `scalars.dtype` and rounded once when written.

        Args:
            params: The model variables.
            grads: Their gradients (dense, or sparse where Keras's ops
                take sparse tensors).
            ms: Their first moments.
            vs: Their second moments.
            v_hats: Their running maxima of `v` (None entries without AMSGrad).
            scalars: The step's scalars, in the compute dtype.

        Quantized moments (`QuantizedMoment`) are decoded, stepped in the
        compute dtype and encoded again.
        """
        dtype = scalars.dtype

        def read(x: Any) -> Any:
            if isinstance(x, QuantizedMoment):
                x = x.value
            return None if x is None else ops.cast(x, dtype)

        for param, grad, m, v, v_hat in zip(params, grads, ms, vs, v_hats, strict=True):
            new = update_rule.adam_step(
                read(param), read(grad), read(m), read(v), read(v_hat), scalars
            )
            for slot, value in zip((m, v, v_hat), new[1:], strict=True):
                if slot is not None:
                    self.assign(slot, value)
            self.assign(param, new.param)

    def assign(self, variable: Any, value: Any) -> None:
        """Write `value` into `variable` (as Keras's `Optimizer.assign`)."""
        variable.assign(value)
