"""Fixtures of tests/torch/."""

import threading

import pytest
import torch


@pytest.fixture
def kernel_calls(monkeypatch):
    """Record every call of torch's fused Adam kernels (and still run them)."""
    calls = []
    for name in ("_fused_adam_", "_fused_adamw_"):
        original = getattr(torch, name)

        def wrapper(params, grads, *tensors, _name=name, _original=original, **kwargs):
            calls.append(
                dict(
                    kernel=_name,
                    count=len(params),
                    shapes=[tuple(p.shape) for p in params],
                    dtype=params[0].dtype,
                    step=float(tensors[3][0]),
                    **{k: v for k, v in kwargs.items() if k != "lr"},
                    lr=float(kwargs["lr"]),
                    threads=torch.get_num_threads(),
                    thread=threading.get_ident(),
                )
            )
            return _original(params, grads, *tensors, **kwargs)

        monkeypatch.setattr(torch, name, wrapper)
    return calls
