"""What runs on the TensorFlow backend.

- Dense gradients, fused path (default where it applies): outside XLA on
  CPU, one multi-tensor op per dtype and device updates all fused variables
  of a step (`KerasAdamMultiTensorApplyAdam`, `keras_adam.kernels`); under
  tf.distribute the same op once per variable (each replica's update runs
  on its own). Under XLA, on other devices and where the kernels are
  unavailable, the `keras.ops` step, which is Keras's own arithmetic and
  which XLA compiles to the speed of Keras's Adam under XLA.
- `tf.IndexedSlices` gradients (Embedding layers): densified, or with
  `lazy_sparse=True` only the touched rows: one `KerasAdamSparseApplyAdam`
  op outside XLA on CPU, else gathers and scatters of `keras.ops`.
- Everything else: the `keras.ops` transcription of `keras_adam.update_rule`.
- `skip_nonfinite`: the whole step under `tf.cond`, with one verdict summed
  over the replicas (and workers) of a tf.distribute strategy.

Every path gives Keras's numbers: the kernels take their scalars (1 − β1,
1 − β2 and the bias-corrected step size) computed as
`keras.optimizers.Adam.update_step` computes them (`_fused_scalars`).
TensorFlow's `ResourceApplyAdam` is not used: it computes 1 − β from the
β rounded to the variable's dtype (1.3e-5 relative off Keras's 1 − β2 in
float32).
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable
from typing import Any

import keras
import tensorflow as tf
from keras import ops
from tensorflow.python.ops import control_flow_util  # is this graph compiled by XLA?

from keras_adam import kernels, update_rule
from keras_adam.backends.engine import Engine


class _PerStepCache(threading.local):
    """Values shared by the variables of one step (not tracked by Keras).

    Thread-local: under MirroredStrategy each replica runs the step in its
    own thread.
    """

    values: dict | None = None


def _tensor(x: Any) -> Any:
    """The `tf.Variable` or tensor behind a `keras.Variable` (anything else as is)."""
    return x.value if isinstance(x, keras.Variable) else x


def _in_xla() -> bool:
    """Whether the graph being built is compiled by XLA."""
    return control_flow_util.GraphOrParentsInXlaContext(tf.compat.v1.get_default_graph())


def _kernel_module(*variables: Any) -> Any | None:
    """The loaded `keras_adam.kernels` library where its ops can update `variables`.

    They can outside XLA (the ops have no XLA kernel), on CPU variables, and
    where the library is available (`keras_adam.kernels.load`); else None.
    """
    if _in_xla():
        return None
    for x in variables:
        if tf.DeviceSpec.from_string(x.device or "").device_type not in (None, "CPU"):
            return None
    return kernels.load()


def _dense(scalars: dict) -> dict:
    """The multi-tensor op's scalars: `_fused_scalars` but `lr` (applied in `alpha`)."""
    return {name: value for name, value in scalars.items() if name != "lr"}


def _coalesce_rows(gradient: Any) -> tuple[Any, Any]:
    """Sum the slices of repeated indices of a `tf.IndexedSlices`.

    Outside XLA, `tf.unique` finds the distinct rows in one hashing pass and
    only those rows are updated. XLA has no kernel for `tf.unique` (its
    output shape depends on the data), so under XLA the indices are sorted
    instead (`_sorted_positions`) and every position carries its row's
    total: repeated positions then compute and write identical rows, and
    shapes stay static.

    Returns:
        `(rows, totals)`: row indices, and for each the sum of all slices
        with that index.
    """
    indices = gradient.indices
    if not _in_xla():
        rows, segment = tf.unique(indices)
        return rows, tf.math.unsorted_segment_sum(gradient.values, segment, tf.shape(rows)[0])
    rows, order = _sorted_positions(indices)
    values = tf.gather(gradient.values, order)
    previous = tf.concat([tf.constant([-1], dtype=rows.dtype), rows[:-1]], axis=0)
    segment = tf.cumsum(tf.cast(tf.not_equal(rows, previous), tf.int32)) - 1
    totals = tf.math.unsorted_segment_sum(values, segment, tf.shape(rows)[0])
    return rows, tf.gather(totals, segment)


def _sorted_positions(indices: Any) -> tuple[Any, Any]:
    """`(sorted indices, their positions)` under XLA, a stable sort with static shapes.

    Not `tf.argsort`: it calls `top_k` with `k` a tensor, which XLA lowers
    with `set-dimension-size`, a dynamic shape. One dynamic shape makes XLA's
    dynamic padder inline every called computation of the program, and
    among them the Philox generator of each `Dropout`, which is then fused
    into every consumer and recomputed element by element: a transformer
    classifier's step took 5.7x as long as with dense gradients. `XlaSort`
    of one int64 key per position, `index * n + position`, sorts with
    static shapes, and the keys are distinct, so the order is the stable one.
    """
    from tensorflow.compiler.tf2xla.python import xla

    n = tf.shape(indices, out_type=tf.int64)[0]
    keys = xla.sort(tf.cast(indices, tf.int64) * n + tf.range(n, dtype=tf.int64))
    return tf.cast(keys // n, indices.dtype), tf.cast(keys % n, tf.int32)


class TensorFlowEngine(Engine):
    """The TensorFlow engine: our kernels, sparse rows, tf.distribute."""

    sparse_gradients = True

    def __init__(self, optimizer: Any) -> None:
        super().__init__(optimizer)
        self._per_step = _PerStepCache()

    # -- which path ------------------------------------------------------------

    def fused_flag_blockers(self) -> list[str]:
        """Why the options rule out the fused kernels (empty if they don't)."""
        optimizer = self.optimizer
        blockers = []
        if optimizer.epsilon_mode != "hat":
            blockers.append('epsilon_mode="paper" (the kernels add ε before bias correction)')
        if optimizer.amsgrad:
            blockers.append("amsgrad=True (the kernels keep no running maximum of v)")
        if optimizer.rectify:
            blockers.append("rectify=True")
        return blockers

    def fused_dtype_blocker(self, variable: Any) -> str | None:
        """Why `variable` cannot take the fused kernels (None if it can)."""
        dtype = keras.backend.standardize_dtype(variable.dtype)
        if dtype not in ("float32", "float64"):
            return (
                f"its dtype is {dtype}; the kernels compute in the variable's dtype, "
                "so only float32 and float64 are fused"
            )
        moment_dtype = self.optimizer.moment_dtype
        if moment_dtype not in (None, dtype):
            return f"moment_dtype={moment_dtype!r} differs from its dtype {dtype}"
        return None

    def restore_scope(self) -> contextlib.AbstractContextManager:
        """`fit` may build inside a traced function: restore eagerly."""
        return tf.init_scope()

    def is_sparse(self, gradient: Any) -> bool:
        """Whether `gradient` is a `tf.IndexedSlices`."""
        return isinstance(gradient, tf.IndexedSlices)

    def all_reduce_sum_gradients(self, grads_and_vars: list, all_reduce: Callable) -> list:
        """Keras's sum of the gradients over replicas, skipped when there is one.

        Outside a `tf.distribute` strategy the sum is the identity, but
        TensorFlow's all-reduce, traced in a `tf.function`, registers a new
        custom gradient in a process-wide registry that is never emptied:
        each traced train step (about 7 000 Python objects, a whole
        `FuncGraph`) would stay alive until the process ends, and every
        `gc.collect` would walk it (TensorFlow issue #97697). A loop that
        builds and fits many models (a hyperparameter search) grew by one
        such graph a model.
        """
        if not tf.distribute.has_strategy():
            return list(grads_and_vars)
        return all_reduce(grads_and_vars)

    # -- skipping non-finite steps ---------------------------------------------

    def apply_skipping_nonfinite(
        self, apply: Callable, grads: list, trainable_variables: list | None
    ) -> None:
        """The whole step under `tf.cond(all gradients finite)`; else count the skip.

        Under tf.distribute the count of bad gradients is summed over all
        replicas and workers: a replica that skipped alone would
        desynchronize the collectives of the step.
        """
        counter = self.optimizer.skipped_steps
        nonfinite = self.count_nonfinite(grads)

        def skip() -> None:
            counter.assign_add(1)

        def step() -> None:
            apply(grads, trainable_variables)

        def cross_replica(strategy: Any, nonfinite: Any, grads: Any, variables: Any) -> None:
            # The step calls `merge_call`, which a condition in replica
            # context cannot contain: decide here, then run every replica on
            # its own gradients (passed in, so they arrive per replica).
            count = strategy.experimental_local_results(nonfinite)[0]
            ops.cond(
                ops.equal(count, 0),
                lambda: strategy.extended.call_for_each_replica(apply, args=(grads, variables)),
                skip,
            )

        if tf.distribute.has_strategy() and not tf.distribute.in_cross_replica_context():
            context = tf.distribute.get_replica_context()
            nonfinite = context.all_reduce(tf.distribute.ReduceOp.SUM, nonfinite)
            if not tf.__internal__.distribute.strategy_supports_no_merge_call():
                context.merge_call(cross_replica, args=(nonfinite, grads, trainable_variables))
                return
        ops.cond(ops.equal(nonfinite, 0), step, skip)

    # -- the step ----------------------------------------------------------------

    def update_all(
        self, grads: list, variables: list, learning_rate: Any, update_each: Callable
    ) -> None:
        """One step of all variables, the fused ones together.

        The fused kernels' scalars are computed once per step and dtype, and
        the fused variables are updated by one op (`_flush_multi_tensor`).
        """
        self._per_step.values = {}
        try:
            update_each(grads, variables, learning_rate)
            self._flush_multi_tensor()
        finally:
            self._per_step.values = None

    def update_variable(self, gradient: Any, variable: Any, slots: list, hyper: dict) -> None:
        """One variable: lazy rows, a fused kernel, or the `keras.ops` path."""
        optimizer = self.optimizer
        if isinstance(gradient, tf.IndexedSlices):
            if optimizer.lazy_sparse:
                self._update_rows(gradient, variable, slots, hyper)
                return
            gradient = tf.convert_to_tensor(gradient)
        if self.fused_applies(variable) and self._fused_update(variable, gradient, slots, hyper):
            return
        optimizer._reference_update(gradient, variable, slots, hyper)

    # -- the fused path ---------------------------------------------------------

    def _fused_update(self, variable: Any, gradient: Any, slots: list, hyper: dict) -> bool:
        """The same step as `update_rule.adam_step` in our multi-tensor kernel.

        It applies outside XLA (the op has no XLA kernel), on CPU variables,
        and where the kernels are available (`keras_adam.kernels.load`).
        Maximize, L2 and decoupled weight decay are applied around it by the
        same functions `adam_step` uses.

        Within one step without a distribution strategy, the kernel call is
        deferred: `_flush_multi_tensor` then updates all variables of a
        dtype with one op, one pass per element. The decay and gradient
        changes above are already in the graph, ordered before it. Under
        tf.distribute each component variable is updated on its own, by the
        same op with one variable.

        Returns:
            Whether the update was done; if False, nothing was (the caller
            takes the `keras.ops` path, which XLA fuses).
        """
        optimizer = self.optimizer
        var = _tensor(variable)
        m, v = (_tensor(slot) for slot in slots[:2])
        module = _kernel_module(var, m, v)
        if module is None:
            return False
        dtype = var.dtype
        decay = dict(
            weight_decay=hyper["weight_decay"],
            decoupled_weight_decay=optimizer.decoupled_weight_decay,
        )
        gradient = update_rule.effective_gradient(
            tf.cast(gradient, dtype), var, maximize=optimizer.maximize, **decay
        )
        if decay["weight_decay"] and optimizer.decoupled_weight_decay:
            lr = tf.cast(hyper["learning_rate"], dtype)
            var.assign(update_rule.decoupled_decay(var, lr=lr, **decay))
        scalars = self._fused_scalars(dtype, hyper["learning_rate"])
        group = self._multi_tensor_group(var)
        if group is not None:
            group.append((var, m, v, gradient))
            return True
        module.keras_adam_multi_tensor_apply_adam(
            var=[var.handle], m=[m.handle], v=[v.handle], grad=[gradient], **_dense(scalars)
        )
        return True

    def _fused_scalars(self, dtype: Any, learning_rate: Any) -> dict:
        """The kernels' scalar inputs, computed once per step and dtype.

        As `keras.optimizers.Adam.update_step` computes them, so that the
        kernels give its numbers: `1 - beta_1` and `1 - beta_2` in Python
        (double), rounded once to `dtype`; the step size
        `lr * sqrt(1 - beta_2_power) / (1 - beta_1_power)` with the same
        TensorFlow ops in the same order. (Keras computes the β powers of
        float64 variables from β rounded through float32; we use the exact
        β, as `update_rule.adam_step` does.)

        Many small variables would otherwise each pay for reading the step
        counter and computing β powers: per-variable work is what dominates
        their update.

        Returns:
            `lr`, `alpha` (the step size), `one_minus_beta1`,
            `one_minus_beta2` and `epsilon`, scalar tensors of `dtype`.
        """
        optimizer = self.optimizer
        cache = self._per_step.values
        if cache is not None and dtype in cache:
            return cache[dtype]
        t = tf.cast(optimizer.iterations + 1, dtype)
        lr = tf.cast(learning_rate, dtype)
        beta_1_power = tf.pow(tf.constant(optimizer.beta_1, dtype), t)
        beta_2_power = tf.pow(tf.constant(optimizer.beta_2, dtype), t)
        scalars = dict(
            lr=lr,
            alpha=lr * tf.sqrt(1 - beta_2_power) / (1 - beta_1_power),
            one_minus_beta1=tf.constant(1 - optimizer.beta_1, dtype),
            one_minus_beta2=tf.constant(1 - optimizer.beta_2, dtype),
            epsilon=tf.constant(optimizer.epsilon, dtype),
        )
        if cache is not None:
            cache[dtype] = scalars
        return scalars

    def _multi_tensor_group(self, var: Any) -> list | None:
        """The list `var`'s deferred multi-tensor update joins, or None to run it now.

        Updates are deferred within a step (`update_all`) without a
        distribution strategy; the caller has checked that the kernel
        applies (`_kernel_module`).
        """
        cache = self._per_step.values
        if cache is None or tf.distribute.has_strategy():
            return None
        groups = cache.setdefault("multi_tensor", {})
        return groups.setdefault((var.dtype, var.device), [])

    def _flush_multi_tensor(self) -> None:
        """One multi-tensor op per group of deferred fused updates."""
        groups = (self._per_step.values or {}).pop("multi_tensor", {})
        module = kernels.load() if groups else None
        for (dtype, _), group in groups.items():
            variables, ms, vs, gradients = zip(*group, strict=True)
            module.keras_adam_multi_tensor_apply_adam(
                var=[x.handle for x in variables],
                m=[x.handle for x in ms],
                v=[x.handle for x in vs],
                grad=list(gradients),
                **_dense(self._fused_scalars(dtype, None)),
            )

    # -- the lazy sparse path ---------------------------------------------------

    def _update_rows(self, gradient: Any, variable: Any, slots: list, hyper: dict) -> None:
        """The lazy update: only the rows a `tf.IndexedSlices` gradient touches.

        Repeated indices are summed first (the update is not linear). Where
        the fused path applies, outside XLA on CPU, one op does it all
        (`_fused_update_rows`); elsewhere `_coalesce_rows` and `keras.ops`
        gathers and scatters, which compile under XLA.
        """
        if self._fused_update_rows(gradient, variable, slots, hyper):
            return
        optimizer = self.optimizer
        rows, row_gradients = _coalesce_rows(gradient)
        dtype = optimizer._compute_dtype(variable, slots)

        def read_rows(x: Any) -> Any:
            return ops.cast(tf.gather(_tensor(x), rows), dtype)

        new = update_rule.adam_step(
            read_rows(variable),
            ops.cast(row_gradients, dtype),
            *(read_rows(slot) for slot in slots[:2]),
            v_hat=read_rows(slots[2]) if optimizer.amsgrad else None,
            step=optimizer.iterations + 1,
            **hyper,
        )
        # The gradient's own dense shape: reading the variable's shape would read
        # the variable, and a scatter into a variable whose value is still
        # referenced copies the whole table.
        shape = gradient.dense_shape
        for slot, value in zip(slots, new[1:], strict=False):
            optimizer.assign(slot, tf.IndexedSlices(value, rows, shape))
        optimizer.assign(variable, tf.IndexedSlices(new.param, rows, shape))

    def _fused_update_rows(self, gradient: Any, variable: Any, slots: list, hyper: dict) -> bool:
        """The lazy update in one `KerasAdamSparseApplyAdam` op, where it applies.

        It applies where the fused path would (options and dtypes), outside
        XLA (the op has no XLA kernel), on CPU variables, and where the
        kernels are available (`keras_adam.kernels.load`). Under
        tf.distribute it runs once per component variable. The op sums
        repeated indices, then updates the touched rows of the variable and
        its moments in place, with maximize and weight decay, at a cost in
        proportion to the rows touched. Nothing here reads the table: a read
        still alive when the op runs would make it copy the whole table.

        Returns:
            Whether the update was done; if False, nothing was.
        """
        if not self.fused_applies(variable):
            return False
        var, m, v = (_tensor(x) for x in (variable, *slots[:2]))
        module = _kernel_module(var, m, v)
        if module is None:
            return False
        dtype = var.dtype
        optimizer = self.optimizer
        module.keras_adam_sparse_apply_adam(
            var=var.handle,
            m=m.handle,
            v=v.handle,
            grad=tf.cast(gradient.values, dtype),
            indices=gradient.indices,
            weight_decay=tf.constant(hyper["weight_decay"], dtype),
            decoupled_weight_decay=optimizer.decoupled_weight_decay,
            maximize=optimizer.maximize,
            **self._fused_scalars(dtype, hyper["learning_rate"]),
        )
        return True
