r"""What runs on the PyTorch backend.

- Dense float32 and float64 variables whose moments share their dtype, in
  the default `fused=None` (and with `fused=True`): PyTorch's own fused Adam
  kernels, `torch._fused_adam_` (L2 weight decay, or none) and
  `torch._fused_adamw_` (decoupled weight decay), the kernels of
  `torch.optim.Adam(fused=True)`. One call per group of variables that share
  a device, a dtype and a weight decay $\lambda$ (0 for the variables
  excluded from decay), and on CPU a size class: variables under `SMALL`
  elements are updated in one call on the calling thread alone
  (`_one_thread`). A model's step is a few calls.
  Every option they can express runs in them: `epsilon_mode="paper"`
  natively, Keras's $\hat\epsilon$ (the default) as the per-step
  $\epsilon_t = \hat\epsilon/\sqrt{1-\beta_2^t}$, AMSGrad (`velocity_hat`),
  maximize, L2 and decoupled weight decay.
- Quantized moments (`moment_dtype="int8"` or `"int4"`) of contiguous
  float32 CPU variables: our C++ kernel through ctypes
  (`kernels.quantized`), one call per step and set of hyperparameters,
  its pointers planned with the fused groups (`_Plan.quantized`).
- Everything else goes through Keras's per-variable loop to the `keras.ops`
  transcription of `keras_adam.update_rule`: `fused=False`, `rectify=True`
  (RAdam, which the kernels lack), bfloat16/float16 weights (computed in
  float32, see `update_rule.compute_dtype`), moments of another dtype than
  their variable, and steps run inside a `keras.StatelessScope`.
- `skip_nonfinite=True`: one verdict per step on the host (`all_finite`:
  one multi-tensor norm, one read), then the whole of Keras's step or
  nothing but a count.

The kernels read the step $t$ from `state_steps`, which `torch.optim`
increments before its call; Keras increments `optimizer.iterations` after
the update, so the kernels get $t$ = `iterations` + 1. They compute their
bias corrections in double from the exact β, where Keras computes them in
float32 from β rounded to float32; with Keras's ε placement (the default)
they are given the `lr` and ε that make their step Keras's step size
(`update_rule.torch_kernel_scalars`), so that they give Keras's numbers to
float32 round-off. With `epsilon_mode="paper"` they take torch's own `lr`
and ε, and give `torch.optim.Adam`'s numbers. $\epsilon_t$ is a float
argument of the kernels, so $t$ is read on the host once per step (on
CUDA, one synchronization per step; `skip_nonfinite`'s verdict is another).

Which variables go where is planned once (`TorchEngine._plan`) and reused
while the variables and options stay the same: a step checks the gradients'
dtypes, devices and contiguity in bulk and makes one kernel call per group.

Under `torch.compile` (`model.fit` with `jit_compile=True`) each group's
kernel call is our operator `torch.ops.keras_adam.fused_adam_`
(`torch.library`): the graph holds it as an in-place update of the
variables and moments, with no graph break, and at run time it reads $t$
and η and calls the same kernel as an eager step, so compiled and eager
steps agree bit for bit. The grouping is done as the step is traced
(`_compiled_fused_step`). Two things stay outside the graph
(`torch.compiler.disable`, one graph break each): quantized moments' kernel,
whose plan holds raw pointers, and `skip_nonfinite`'s verdict, a host
decision by nature.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import glob
import operator
import os
from dataclasses import dataclass, field
from typing import Any

import keras
import numpy as np
import torch
from keras.src.backend.common.stateless_scope import in_stateless_scope
from keras.src.backend.torch.core import get_device
from torch.autograd.graph import increment_version

from keras_adam import quantization, update_rule
from keras_adam.backends.engine import (
    Engine,
    KerasApply,
    Options,
    ScalarsCache,
    Update,
    compute_dtype,
    quantized_kernel_flags,
)
from keras_adam.kernels import quantized as quantized_kernel
from keras_adam.quantization import QuantizedMoment
from keras_adam.update_rule import Hyperparameters, StepScalars

#: Variable dtypes the fused kernels take (they compute in the variable's dtype).
FUSED_DTYPES = ("float32", "float64")
#: CPU variables smaller than this (torch's `at::internal::GRAIN_SIZE`) are
#: updated with one thread. torch's CPU kernel splits every tensor across
#: all threads (grain size 0): an OpenMP region per tensor, whose start and
#: barrier cost more than a small tensor's update. A group of them is one
#: call on the calling thread alone, not cut into parts run on helper
#: threads: in `model.fit` the step follows the backward pass, whose OpenMP
#: workers still spin on the other cores, and a helper thread waits for a
#: core behind them. Measured on 2 cores (`benchmarks`' 200 small variables,
#: and `fit` of MLPs of 60-150 small layers): parts on two threads made the
#: step alone 12% faster (the median of five runs, from 8% slower to 16%
#: faster), but 10-16% slower right after a parallel op, and epochs 4-10%
#: slower.
SMALL = 32768


def _fused_device_types() -> tuple[str, ...]:
    """Device types that have torch's fused Adam kernels."""
    try:
        from torch.utils._foreach_utils import _get_fused_kernels_supported_devices

        return tuple(_get_fused_kernels_supported_devices())
    except ImportError:  # pragma: no cover - older torch
        return ("cpu", "cuda")


#: Device types that have torch's fused Adam kernels (read once: a step under
#: `torch.compile` must not import).
FUSED_DEVICE_TYPES = _fused_device_types()


def _tensor(x: Any) -> Any:
    """The torch tensor behind a `keras.Variable` (a tensor as is)."""
    return x.value if isinstance(x, keras.Variable) else x


_DTYPE = operator.attrgetter("dtype")
_DEVICE = operator.attrgetter("device")
_VALUE = operator.attrgetter("_value")


@dataclass
class _Group:
    r"""Variables updated by one fused kernel call.

    Attributes:
        device: Their device.
        dtype: Their dtype (and their moments').
        hyper: Their hyperparameters ($\lambda$ is 0 where decay does not apply).
        compute_dtype: Their compute dtype's name.
        single_threaded: Whether the call runs on one thread (small CPU
            variables, see `SMALL`).
        indices: Their positions in the step's variable list.
        params: The variables' tensors.
        exp_avgs: The first moments' tensors.
        exp_avg_sqs: The second moments' tensors.
        max_exp_avg_sqs: With AMSGrad, the `velocity_hat` tensors; else empty.
    """

    device: torch.device
    dtype: torch.dtype
    hyper: Hyperparameters
    compute_dtype: str
    single_threaded: bool
    indices: list[int] = field(default_factory=list)
    params: list[torch.Tensor] = field(default_factory=list)
    exp_avgs: list[torch.Tensor] = field(default_factory=list)
    exp_avg_sqs: list[torch.Tensor] = field(default_factory=list)
    max_exp_avg_sqs: list[torch.Tensor] = field(default_factory=list)

    def add(self, index: int, tensors: list[torch.Tensor]) -> None:
        """Add the variable at `index` of the step: its tensor, then its moments' tensors."""
        self.indices.append(index)
        self.params.append(tensors[0])
        self.exp_avgs.append(tensors[1])
        self.exp_avg_sqs.append(tensors[2])
        self.max_exp_avg_sqs.extend(tensors[3:])

    def tensors(self, members: Any) -> tuple[list, list, list, list]:
        """The kernel's four tensor lists, for the members at these positions of the group."""
        lists = (self.params, self.exp_avgs, self.exp_avg_sqs, self.max_exp_avg_sqs)
        if len(members) == len(self.indices):
            return lists
        return tuple([x[k] for k in members] if x else [] for x in lists)


@dataclass
class _QuantizedGroup:
    """Variables with quantized moments stepped by one call of the quantized kernel.

    Attributes:
        hyper: Their hyperparameters.
        indices: Their positions in the step's variable list.
        pointers: Each buffer's data pointers (`quantized_kernel.BUFFERS`
            but the gradient), in the order of `indices`.
        sizes: Each variable's number of values.
        written: Per variable, the tensors the kernel writes (the variable
            and its moments): their versions are bumped, as in-place ops do.
    """

    hyper: Hyperparameters
    indices: list[int] = field(default_factory=list)
    pointers: dict[str, list[int]] = field(default_factory=dict)
    sizes: list[int] = field(default_factory=list)
    written: list[list[torch.Tensor]] = field(default_factory=list)


@dataclass
class _Plan:
    """How the variables of a step run: fused groups, and the rest.

    Computed once for a list of variables and options (`TorchEngine._plan`),
    reused while they stay the same.

    Attributes:
        key: What it was computed for (variable identities and options).
        groups: The fused kernel calls.
        quantized: The quantized kernel's calls.
        rest: Positions of the variables that take the reference path.
        dtypes: Each variable's torch dtype, in order.
        devices: Each variable's device, in order.
        bound_variables: Every `keras.Variable` (model variable or moment)
            whose tensor a group holds...
        bound_tensors: ... and that tensor: the plan is stale if one changed.
    """

    key: tuple
    groups: list[_Group]
    quantized: list[_QuantizedGroup]
    rest: tuple[int, ...]
    dtypes: tuple[torch.dtype, ...]
    devices: tuple[torch.device, ...]
    bound_variables: list[Any]
    bound_tensors: list[torch.Tensor]

    def is_current(self) -> bool:
        """Whether every variable still holds the tensor the plan holds."""
        try:
            return all(map(operator.is_, map(_VALUE, self.bound_variables), self.bound_tensors))
        except AttributeError:
            return False

    def gradients_ready(self, grads: list) -> bool:
        """Whether the kernels can read `grads` as they are.

        True if every gradient is a contiguous tensor of its variable's dtype
        and device (then no None either). Checked in bulk: this runs every step.
        """
        try:
            return (
                tuple(map(_DTYPE, grads)) == self.dtypes
                and tuple(map(_DEVICE, grads)) == self.devices
                and all(map(torch.Tensor.is_contiguous, grads))
            )
        except (AttributeError, TypeError, RuntimeError):
            return False


class TorchEngine(Engine):
    """The PyTorch engine: torch's fused Adam kernels, grouped by device, dtype and decay."""

    def __init__(self) -> None:
        self._cached_plan: _Plan | None = None

    # -- which path ------------------------------------------------------------

    def fused_blockers(self, options: Options) -> list[str]:
        """Why the options rule out the fused kernels (empty if they don't)."""
        if options.hyper.rectify:
            return ["rectify=True (torch's fused Adam kernels have no RAdam)"]
        return []

    def variable_blocker(self, variable: Any, options: Options) -> str | None:
        """Why `variable` cannot take the fused kernels (None if it can)."""
        dtype = keras.backend.standardize_dtype(variable.dtype)
        if dtype not in FUSED_DTYPES:
            return (
                f"its dtype is {dtype}; keras_adam computes {dtype} steps in float32, "
                "which torch's fused kernels (same dtype for weights and moments) "
                "cannot, so only float32 and float64 are fused"
            )
        storage = options.moment_storage(variable)
        if storage in quantization.QUANTIZED_DTYPES:
            return f"its moments are quantized (moment_dtype={storage!r})"
        if storage not in (None, dtype):
            return (
                f"moment_dtype={options.moment_dtype!r} differs from its dtype {dtype} "
                "(torch's fused kernels take one dtype per call)"
            )
        value = getattr(variable, "_value", None)
        if isinstance(value, torch.Tensor) and value.device.type not in FUSED_DEVICE_TYPES:
            return f"its device {value.device} has no fused Adam kernel"
        return None

    # -- skipping non-finite steps ---------------------------------------------

    def apply_skipping_nonfinite(self, step: KerasApply, counter: Any) -> None:
        """Keras's `apply` if every gradient is finite, else count a skip.

        The verdict is read on the host (`all_finite`), so a skipped step
        runs nothing at all: weights, moments, `iterations`, gradient
        accumulators and the weight average keep their exact values.
        (`keras.Variable.value` is the live tensor on this backend, so
        the generic engine's keep-the-old-values select cannot work here.)
        """
        if all_finite(step.grads):
            step()
        else:
            _count_skip(counter)

    # -- the step ----------------------------------------------------------------

    def update(self, update: Update) -> None:
        """One step: the fused groups, then the other variables on the reference path."""
        scalars = ScalarsCache(update)
        with torch.no_grad():
            if self.fuses(update.options):
                if torch.compiler.is_compiling():
                    rest = _compiled_fused_step(self, update)
                else:
                    rest = _fused_step(self, update)
            else:
                rest = [i for i, g in enumerate(update.grads) if g is not None]
            for i in rest:
                self.update_one(update.grads[i], update.variables[i], update, scalars)

    @staticmethod
    def fused(
        params: list,
        grads: list,
        ms: list,
        vs: list,
        v_hats: list,
        scalars: StepScalars,
        *,
        single_threaded: bool = False,
    ) -> None:
        """One call of torch's fused Adam kernel over a group of variables.

        `torch._fused_adamw_` with decoupled weight decay, else
        `torch._fused_adam_`; all tensors share a device and dtype.

        Args:
            params: The variables' tensors.
            grads: Their gradients (dense, contiguous, of their dtype).
            ms: The first moments' tensors.
            vs: The second moments' tensors.
            v_hats: With AMSGrad the `velocity_hat` tensors; else empty.
            scalars: The step's scalars, on the host
                (`update_rule.host_step_scalars`).
            single_threaded: Run on one thread (small CPU tensors).
        """
        hyper = scalars.hyper
        lr, eps = update_rule.torch_kernel_scalars(scalars)
        decoupled = hyper.decoupled_weight_decay and hyper.weight_decay
        kernel = functools.partial(
            torch._fused_adamw_ if decoupled else torch._fused_adam_,
            lr=lr,
            beta1=hyper.beta_1,
            beta2=hyper.beta_2,
            weight_decay=hyper.weight_decay,
            eps=eps,
            amsgrad=hyper.amsgrad,
            maximize=hyper.maximize,
        )
        step = _step_tensor(params[0].device, float(scalars.step))
        with _one_thread() if single_threaded else contextlib.nullcontext():
            kernel(params, grads, ms, vs, v_hats, [step] * len(params))

    def _plan(self, update: Update) -> _Plan:
        """The fused groups of `update.variables` (cached while variables and options hold)."""
        variables = update.variables
        key = (tuple(map(id, variables)), update.options)
        plan = self._cached_plan
        if plan is not None and plan.key == key and plan.is_current():
            return plan
        groups: list[_Group] = []
        quantized: dict[Hyperparameters, _QuantizedGroup] = {}
        rest: list[int] = []
        dtypes, devices = [], []
        bound_variables, bound_tensors = [], []
        for index, variable in enumerate(variables):
            param = _tensor(variable)
            dtypes.append(getattr(param, "dtype", None))
            devices.append(getattr(param, "device", None))
            slots = update.slots(variable)
            if self._quantized_kernel_takes(param, slots):
                hyper = update.hyper(variable)
                group = quantized.get(hyper)
                if group is None:
                    group = quantized[hyper] = _QuantizedGroup(hyper)
                storage = [param, *(_tensor(slot.variable) for slot in slots)]
                group.indices.append(index)
                for name, tensor in zip(
                    (name for name in quantized_kernel.BUFFERS if name != "grad"),
                    storage,
                    strict=False,
                ):
                    group.pointers.setdefault(name, []).append(tensor.data_ptr())
                group.sizes.append(param.numel())
                group.written.append(storage)
                bound_variables += [variable, *(slot.variable for slot in slots)]
                bound_tensors += storage
                continue
            if self.variable_blocker(variable, update.options) is not None:
                rest.append(index)
                continue
            tensors = [param, *(_tensor(x) for x in slots)]
            if not self._fusable(tensors):
                rest.append(index)
                continue
            _group_for(groups, variable, tensors, update).add(index, tensors)
            bound_variables += [variable, *slots]
            bound_tensors += tensors
        plan = _Plan(
            key,
            groups,
            list(quantized.values()),
            tuple(rest),
            tuple(dtypes),
            tuple(devices),
            bound_variables,
            bound_tensors,
        )
        self._cached_plan = plan
        return plan

    def _quantized_kernel_takes(self, param: Any, slots: list) -> bool:
        """Whether the quantized kernel steps a variable.

        That is: quantized moments, a float32 contiguous CPU tensor, and the
        kernel built.
        """
        return (
            bool(slots)
            and isinstance(slots[0], QuantizedMoment)
            and isinstance(param, torch.Tensor)
            and param.dtype == torch.float32
            and param.device.type == "cpu"
            and param.is_contiguous()
            and quantized_kernel.load() is not None
        )

    def _fusable(self, tensors: list) -> bool:
        """Whether a variable's tensors (it, then its moments) can join a fused call."""
        param = tensors[0]
        return all(
            isinstance(t, torch.Tensor)
            and t.layout == torch.strided
            and t.is_contiguous()
            and t.dtype == param.dtype
            and t.device == param.device
            for t in tensors
        )


_STEP_TENSORS: dict[torch.device, torch.Tensor] = {}


def _step_tensor(device: torch.device, t: float) -> torch.Tensor:
    """A float32 scalar holding $t$ on `device` (torch's `state_steps` dtype)."""
    step = _STEP_TENSORS.get(device)
    if step is None:
        step = _STEP_TENSORS[device] = torch.zeros((), dtype=torch.float32, device=device)
    step.fill_(t)
    return step


def _host_scalars(iterations: Any, learning_rate: Any) -> tuple[float, float]:
    r"""$t$ = `iterations` + 1 as the kernels see it (a float32, torch's `state_steps`), and η.

    (`iterations` counts updates: with gradient accumulation it is a tensor.)
    """
    return float(np.float32(int(iterations) + 1)), float(learning_rate)


def fused_adam_(
    params: list[torch.Tensor],
    grads: list[torch.Tensor],
    exp_avgs: list[torch.Tensor],
    exp_avg_sqs: list[torch.Tensor],
    max_exp_avg_sqs: list[torch.Tensor],
    iterations: torch.Tensor,
    learning_rate: torch.Tensor,
    beta_1: float,
    beta_2: float,
    epsilon: float,
    weight_decay: float,
    decoupled_weight_decay: bool,
    epsilon_mode: str,
    amsgrad: bool,
    maximize: bool,
    compute_dtype: str,
    single_threaded: bool,
) -> None:
    r"""One fused kernel call of a group, as a torch operator: `torch.ops.keras_adam.fused_adam_`.

    The step `TorchEngine.fused` takes, with its host scalars ($t$, η)
    read from `iterations` (the optimizer's counter before the step) and
    `learning_rate` when it runs. `torch.compile` sees an operator that
    writes the variables and moments in place (its schema marks them
    mutated; its fake implementation returns nothing), so a compiled `fit`
    keeps the whole step in its graph, with no graph break at the update;
    the kernels run as they do eagerly, on the same numbers.

    It is registered with `torch.library.Library` and a
    `CompositeExplicitAutograd` kernel rather than `torch.library.custom_op`,
    whose Python autograd and version-counting layers cost 0.45 ms a call on
    200 small variables, four times the kernel's own time; the dispatcher's
    C++ fallbacks do that work here, and the versions of the written tensors
    are bumped in one call, as in-place ops do.
    """
    hyper = Hyperparameters(
        beta_1=beta_1,
        beta_2=beta_2,
        epsilon=epsilon,
        weight_decay=weight_decay,
        decoupled_weight_decay=decoupled_weight_decay,
        epsilon_mode=epsilon_mode,
        amsgrad=amsgrad,
        maximize=maximize,
    )
    t, lr = _host_scalars(iterations, learning_rate)
    scalars = update_rule.host_step_scalars(hyper, t, lr, compute_dtype)
    if not all(map(torch.Tensor.is_contiguous, grads)):
        grads = [grad.contiguous() for grad in grads]
    TorchEngine.fused(
        params,
        grads,
        exp_avgs,
        exp_avg_sqs,
        max_exp_avg_sqs,
        scalars,
        single_threaded=single_threaded,
    )
    increment_version([*params, *exp_avgs, *exp_avg_sqs, *max_exp_avg_sqs])


_LIBRARY = torch.library.Library("keras_adam", "FRAGMENT")
_LIBRARY.define(
    "fused_adam_(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] exp_avgs, "
    "Tensor(c!)[] exp_avg_sqs, Tensor(d!)[] max_exp_avg_sqs, Tensor iterations, "
    "Tensor learning_rate, float beta_1, float beta_2, float epsilon, float weight_decay, "
    "bool decoupled_weight_decay, str epsilon_mode, bool amsgrad, bool maximize, "
    "str compute_dtype, bool single_threaded) -> ()"
)
_LIBRARY.impl("fused_adam_", fused_adam_, "CompositeExplicitAutograd")


@torch.library.register_fake("keras_adam::fused_adam_", lib=_LIBRARY)
def _(*args: Any) -> None:
    return None


def _group_for(groups: list[_Group], variable: Any, tensors: list, update: Update) -> _Group:
    """The group of `groups` a fusable variable joins; a new one, appended, if none fits.

    Variables share a kernel call when they share a device, a dtype, their
    hyperparameters and a size class (`SMALL`). `TorchEngine._plan` and
    `_compiled_fused_step` group with it, so compiled and eager steps make
    the same calls. (A list, not a dict keyed by those: `torch.compile`
    traces the comparisons, where hashing the hyperparameters would break
    the graph.)
    """
    param = tensors[0]
    candidate = _Group(
        param.device,
        param.dtype,
        update.hyper(variable),
        compute_dtype(variable, update.slots(variable)),
        param.device.type == "cpu" and param.numel() < SMALL,
    )
    for group in groups:
        if _same_call(group, candidate):
            return group
    groups.append(candidate)
    return candidate


def _same_call(a: _Group, b: _Group) -> bool:
    """Whether two groups' variables can share a kernel call."""
    return (
        a.device == b.device
        and a.dtype == b.dtype
        and a.hyper == b.hyper
        and a.compute_dtype == b.compute_dtype
        and a.single_threaded == b.single_threaded
    )


def _compiled_fused_step(engine: TorchEngine, update: Update) -> list[int]:
    """`_fused_step` as `torch.compile` traces it: one `fused_adam_` call per group.

    The grouping is `TorchEngine._plan`'s (`_group_for`), done as the step
    is traced, so a compiled step makes the same kernel calls as an eager
    one. Quantized moments keep the eager path (outside the graph).
    """
    grads = update.grads
    options = update.options
    if options.moment_dtype in quantization.QUANTIZED_DTYPES:
        return _fused_step(engine, update)
    if in_stateless_scope() or str(get_device()) == "meta":
        return [i for i, g in enumerate(grads) if g is not None]
    groups: list[_Group] = []
    rest = []
    for index, (grad, variable) in enumerate(zip(grads, update.variables, strict=True)):
        if grad is None:
            continue
        tensors = [_tensor(variable), *(_tensor(x) for x in update.slots(variable))]
        if engine.variable_blocker(variable, options) is not None or not engine._fusable(tensors):
            rest.append(index)
            continue
        _group_for(groups, variable, tensors, update).add(index, tensors)
    iterations = _tensor(update.iterations)
    learning_rate = update.learning_rate
    if not isinstance(learning_rate, (torch.Tensor, keras.Variable)):
        learning_rate = torch.tensor(float(learning_rate))
    for group in groups:
        hyper = group.hyper
        torch.ops.keras_adam.fused_adam_(
            group.params,
            [_dense(grads[i], group.dtype, group.device) for i in group.indices],
            group.exp_avgs,
            group.exp_avg_sqs,
            group.max_exp_avg_sqs,
            iterations,
            _tensor(learning_rate),
            hyper.beta_1,
            hyper.beta_2,
            hyper.epsilon,
            hyper.weight_decay,
            hyper.decoupled_weight_decay,
            hyper.epsilon_mode,
            hyper.amsgrad,
            hyper.maximize,
            group.compute_dtype,
            group.single_threaded,
        )
    return rest


@torch.compiler.disable
def _fused_step(engine: TorchEngine, update: Update) -> list[int]:
    r"""Run the fused groups of one step; return the positions left to the reference path.

    Outside `torch.compile`'s graph: the kernels read their scalars (the
    step, $\epsilon_t$) on the host.
    """
    grads = update.grads
    if in_stateless_scope() or str(get_device()) == "meta":
        # Values live in the scope (or are symbolic): only `keras.ops` writes there.
        return [i for i, g in enumerate(grads) if g is not None]
    plan = engine._plan(update)
    if not plan.groups and not plan.quantized:
        return [i for i in plan.rest if grads[i] is not None]
    t, learning_rate = _host_scalars(_tensor(update.iterations), _tensor(update.learning_rate))
    ready = plan.gradients_ready(grads)
    for group in plan.groups:
        members, group_grads = _members(group.indices, grads, ready, group.dtype, group.device)
        if not group_grads:
            continue
        params, exp_avgs, exp_avg_sqs, max_exp_avg_sqs = group.tensors(members)
        engine.fused(
            params,
            group_grads,
            exp_avgs,
            exp_avg_sqs,
            max_exp_avg_sqs,
            update_rule.host_step_scalars(group.hyper, t, learning_rate, group.compute_dtype),
            single_threaded=group.single_threaded,
        )
    for group in plan.quantized:
        _quantized_step(group, grads, ready, update.options.moment_dtype, t, learning_rate)
    return list(plan.rest) if ready else [i for i in plan.rest if grads[i] is not None]


def _members(
    indices: list[int], grads: list, ready: bool, dtype: torch.dtype, device: torch.device
) -> tuple[Any, list]:
    """The members of a group (positions in it) that have a gradient, and their gradients.

    With `ready` (`_Plan.gradients_ready`) all of them, their gradients as
    they are; else those whose gradient is not None, made dense tensors of
    `dtype` on `device`.
    """
    if ready:
        return range(len(indices)), [grads[i] for i in indices]
    members = [k for k, i in enumerate(indices) if grads[i] is not None]
    return members, [_dense(grads[indices[k]], dtype, device) for k in members]


def _quantized_step(
    group: _QuantizedGroup,
    grads: list,
    ready: bool,
    moment_dtype: str,
    t: float,
    learning_rate: float,
) -> None:
    """One call of the quantized kernel over the variables of `group` that have a gradient.

    `kernels.quantized`: decode, float32 Adam, encode, one pass per block.
    The pointers come from the plan; only the gradients' are read here.
    """
    members, group_grads = _members(group.indices, grads, ready, torch.float32, torch.device("cpu"))
    if not group_grads:
        return
    if len(members) == len(group.indices):
        pointers, sizes, written = dict(group.pointers), group.sizes, group.written
    else:
        pointers = {name: [p[k] for k in members] for name, p in group.pointers.items()}
        sizes = [group.sizes[k] for k in members]
        written = [group.written[k] for k in members]
    pointers["grad"] = [grad.data_ptr() for grad in group_grads]
    # Written through raw pointers: mark them modified, as in-place ops do.
    increment_version([tensor for tensors in written for tensor in tensors])
    hyper = group.hyper
    scalars = update_rule.host_step_scalars(hyper, t, learning_rate, "float32")
    quantized_kernel.load().step(
        pointers,
        sizes,
        quantization.formats(moment_dtype),
        {
            "alpha": scalars.alpha,
            "one_minus_beta1": scalars.one_minus_beta_1,
            "one_minus_beta2": scalars.one_minus_beta_2,
            "epsilon": hyper.epsilon,
            "weight_decay": hyper.weight_decay,
            "learning_rate": scalars.learning_rate,
            "bias_correction_2_sqrt": scalars.bias_correction_2_sqrt,
            **quantized_kernel_flags(hyper),
        },
        # The library starts a thread only for enough blocks of work.
        threads=torch.get_num_threads(),
    )


@contextlib.contextmanager
def _one_thread() -> Any:
    """Run torch's CPU ops *of this thread* on one thread (no OpenMP region) inside the block.

    ATen's `parallel_for` asks OpenMP how many threads the calling thread
    may use (`omp_get_max_threads`, a per-thread setting), so setting it
    with the `omp_set_num_threads` of torch's own OpenMP runtime
    (`_thread_count_setter`) touches only this thread, for the block.
    `torch.set_num_threads` would also change the count that threads
    starting their first parallel op meanwhile are given for good; it is
    the fallback where torch's OpenMP cannot be found.
    """
    threads = torch.get_num_threads()
    if threads == 1:
        yield
        return
    set_threads = _thread_count_setter()
    set_threads(1)
    try:
        yield
    finally:
        set_threads(threads)


_SETTER: list = []


def _thread_count_setter() -> Any:
    """`omp_set_num_threads` of the OpenMP runtime torch uses, else `torch.set_num_threads`.

    The runtime is the one torch ships (`torch/lib/libgomp*`, `libiomp5*`),
    checked once: setting it in this thread must be what
    `torch.get_num_threads` then reports.
    """
    if not _SETTER:
        _SETTER.append(_openmp_setter() or torch.set_num_threads)
    return _SETTER[0]


def _openmp_setter() -> Any:
    """The `omp_set_num_threads` of torch's OpenMP, or None if not found or not acting."""
    threads = torch.get_num_threads()
    folder = os.path.join(os.path.dirname(torch.__file__), "lib")
    for pattern in ("libgomp*.so*", "libiomp5*.so*", "libomp*.so*"):
        for path in sorted(glob.glob(os.path.join(folder, pattern))):
            try:
                setter = ctypes.CDLL(path).omp_set_num_threads
            except (OSError, AttributeError):
                continue
            setter.argtypes, setter.restype = [ctypes.c_int], None
            acted = False
            probe = 2 if threads == 1 else 1
            try:
                setter(probe)
                acted = torch.get_num_threads() == probe
            finally:
                setter(threads)
            if acted and torch.get_num_threads() == threads:
                return setter
    return None


def _dense(gradient: Any, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """`gradient` as a dense, contiguous tensor of `dtype` on `device`.

    The kernels read a raw pointer, so a non-contiguous gradient is copied;
    a NumPy array is converted.
    """
    gradient = _tensor(gradient)
    if not isinstance(gradient, torch.Tensor):
        gradient = torch.as_tensor(gradient)
    if gradient.layout != torch.strided:
        gradient = gradient.to_dense()
    if gradient.dtype != dtype or gradient.device != device:
        gradient = gradient.to(device=device, dtype=dtype)
    return gradient.contiguous()


@torch.compiler.disable
def all_finite(grads: list) -> bool:
    """Whether every gradient of `grads` is finite (None entries ignored).

    A finite sum of squares has no NaN or infinity among its terms, so one
    `torch._foreach_norm` (the multi-tensor L2 norm, the fastest reduction
    torch has over many tensors) and one read on the host decide the common
    case. A norm that is not finite may also be an overflow of finite
    values (|g| ≳ 1.8e19 in float32, 256 in float16): those tensors are then
    checked element by element, so the verdict is exact.

    Args:
        grads: Gradients (tensors, `keras.Variable`s or None).

    Returns:
        True if no gradient holds a NaN or an infinity.
    """
    tensors = []
    for gradient in grads:
        if gradient is None:
            continue
        gradient = _tensor(gradient)
        if gradient.layout != torch.strided:
            # (Uncoalesced values: summing repeated rows could overflow.)
            gradient = gradient._values() if gradient.is_sparse else gradient.to_dense()
        if gradient.numel():
            tensors.append(gradient)
    if not tensors:
        return True
    norms = torch._foreach_norm(tensors, 2)
    if len({n.device for n in norms}) > 1:
        norms = [n.cpu() for n in norms]
    if bool(torch.isfinite(torch.stack(norms)).all()):
        return True
    suspects = [x for x, norm in zip(tensors, norms, strict=True) if not torch.isfinite(norm)]
    return all(bool(torch.isfinite(x).all()) for x in suspects)


@torch.compiler.disable
def _count_skip(counter: Any) -> None:
    counter.assign_add(1)
