"""Every private PyTorch API the DDF op relies on, in one place.

Each function names what the public API lacks. Which torch has which: all of them are in torch 2.4.1,
2.11.0, 2.14.1 and 2.15.0 (the versions scripts/torch_versions.sh and CI test), except
``torch._C._any_requires_grad``, which torch 2.4.1 lacks (:func:`any_requires_grad` then loops in Python).
Of the public APIs the op uses, ``torch.library.register_vmap`` is from torch 2.5 (see
``ddfnet.ops.registrations._register_vmap`` for what happens before). Revisit these with each new torch
release, since private names may change or gain a public equivalent. The tests that fail when one of them
breaks: tests/test_double_backward.py (torch.func, forward AD), tests/test_op.py and tests/test_export.py
(autocast at the dispatcher, torch.compile/export).
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch.autograd import forward_ad


def under_torch_func() -> bool:
    """Whether a torch.func transform (grad, jvp, vmap, ...) is running.

    No public query tells, and code must know: an autograd.Function must be applied above the dispatcher
    under them (functorch handles it level by level), and they reject checkpointing's saved-tensor hooks.
    Under torch.compile the op stays one opaque node, so dynamo need not see the private call.
    """
    return not torch.compiler.is_compiling() and torch._C._are_functorch_transforms_active()


def below_autograd():
    """A context in which calls skip the Autograd dispatch key.

    The public way (``torch.no_grad`` plus no forward AD) still passes through the Autograd kernel; an
    Autograd-key kernel that redispatches must run below it, like C++'s ``AutoDispatchBelowADInplaceOrView``.
    """
    return torch._C._AutoDispatchBelowAutograd()


def any_requires_grad(*args: Any) -> bool:
    # The public equivalent is a Python loop over the arguments; the C++ one runs on every op call, where
    # torch has it (from 2.8). Before, the loop (the op's arguments are flat: tensors, ints, a str).
    if _any_requires_grad is None:
        return any(isinstance(a, torch.Tensor) and a.requires_grad for a in args)
    return _any_requires_grad(*args)


_any_requires_grad = getattr(torch._C, '_any_requires_grad', None)


def forward_ad_enabled() -> bool:
    # torch.autograd.forward_ad has no public "is a dual level open and forward grad enabled" query.
    return forward_ad._current_level >= 0 and torch._C._is_fwd_grad_enabled()


def after_autograd(keyset: torch._C.DispatchKeySet) -> torch._C.DispatchKeySet:
    # Library.impl(with_keyset=True) hands the kernel its keyset, but no public constant masks off the
    # Autograd keys for OpOverload.redispatch.
    return keyset & torch._C._after_autograd_keyset


def autocast_key_name(device_type: str) -> str:
    """'AutocastCPU' for 'cpu', 'AutocastCUDA' for 'cuda' (the dispatch key Library.impl takes)."""
    return 'Autocast' + torch._C._dispatch_key_for_device(device_type)


def excluding_key(key_name: str):
    """A context in which dispatch skips ``key_name``: the autocast kernel's call below autocast.

    torch.library.register_autocast does this internally, but only casts to a dtype fixed when it is
    registered; the op's rule follows the autocast dtype of the moment.
    """
    return torch._C._ExcludeDispatchKeyGuard(torch._C.DispatchKeySet(getattr(torch._C.DispatchKey, key_name)))


def register_python_dispatcher_kernel(op: torch._ops.OpOverload, key_name: str, kernel: Callable) -> None:
    # Tracing (torch.compile, torch.export) runs the Python dispatcher, which reads kernels registered with
    # OpOverload.py_impl instead of the C++ dispatcher's; torch.library has no public form of it.
    op.py_impl(getattr(torch._C.DispatchKey, key_name))(kernel)
