"""Everything the DDF op registers with PyTorch, done by one function, :func:`register_all`.

Two operators live in the ``ddfnet`` namespace:

* ``torch.ops.ddfnet.ddf(input, channel_filter, spatial_filter, kernel_size, dilation, stride,
  kernel_combine) -> Tensor``
* ``torch.ops.ddfnet.ddf_backward(grad_output, input, channel_filter, spatial_filter, kernel_size,
  dilation, stride, kernel_combine) -> (grad_input, grad_channel_filter, grad_spatial_filter)``

The schemas are declared once, in C++ (``csrc/ddf.cpp``), and the native CPU and CUDA kernels register
there; this module adds the rest: the reference kernel for other devices, fake (meta) kernels, the
Autograd kernels and vmap rules of :mod:`ddfnet.ops.autograd`, FLOP formulas, the autocast kernels and
the TorchScript ONNX symbolic. With them ``torch.library.opcheck`` passes and
``torch.compile(fullgraph=True)`` traces through the op without graph breaks. When the extension cannot
be loaded or built (see :mod:`ddfnet.ops._native`), or ``DDFNET_FORCE_REFERENCE=1`` is set, the same
schemas are defined here instead. A CUDA tensor runs the native CUDA kernels when the extension has them,
else the Triton kernels of :mod:`ddfnet.ops.triton_ddf` when triton imports, else the reference;
``DDFNET_CUDA_KERNELS=native|triton|reference`` forces one. Any other device without a native kernel runs
the pure-PyTorch reference in :mod:`ddfnet.ops.reference`; the reference says so once with a
:class:`DDFSlowPathWarning`. :func:`implementation` tells which one a device type gets.
"""
from __future__ import annotations

import os
import warnings
from collections.abc import Callable
from types import ModuleType

import torch
from torch.utils import flop_counter

from . import _native, _torch_internals, triton_ddf
from .autocast import autocast_inputs
from .autograd import autograd_kernels, operator_vmap_rules
from .checks import check_ddf_args
from .decomposition import register_torchscript_symbolic
from .reference import ddf_backward_reference, ddf_forward_reference, new_output, output_size

__all__ = ['register_all', 'implementation', 'native_device_types', 'native_unavailable_reason',
           'choose_cuda_kernels', 'DDFSlowPathWarning', 'SCHEMAS', 'CUDA_KERNELS_ENV']

CUDA_KERNELS_ENV = 'DDFNET_CUDA_KERNELS'
CUDA_KERNELS = ('native', 'triton', 'reference')  # in order of preference

# The schemas of csrc/ddf.cpp, for the pure-Python fallback only; a test checks they match the C++ ones.
SCHEMAS = {
    'ddf': 'ddf(Tensor input, Tensor channel_filter, Tensor spatial_filter, int kernel_size, int dilation, '
           'int stride, str kernel_combine) -> Tensor',
    'ddf_backward': 'ddf_backward(Tensor grad_output, Tensor input, Tensor channel_filter, '
                    'Tensor spatial_filter, int kernel_size, int dilation, int stride, str kernel_combine) '
                    '-> (Tensor, Tensor, Tensor)',
}


class DDFSlowPathWarning(UserWarning):
    """Issued once per device type when the DDF op falls back to the pure-PyTorch reference implementation."""


_extension: ModuleType | None = None
_no_extension_reason = 'ddfnet.ops.registrations.register_all() has not run'
_libraries: list[torch.library.Library] = []  # registrations live as long as their Library object
_warned: set[str] = set()
_cuda_kernels: str | None = None  # what CUDA tensors run, chosen by register_all()


def native_device_types() -> tuple[str, ...]:
    """Device types with a native kernel in this process ('cpu', and 'cuda' for a CUDA build)."""
    if _extension is None:
        return ()
    return ('cpu', 'cuda') if _extension.with_cuda else ('cpu',)


def implementation(device_type: str) -> str:
    """'native', 'triton' (CUDA only) or 'reference': which DDF implementation runs on ``device_type``."""
    if device_type == 'cuda' and _cuda_kernels is not None:
        return _cuda_kernels
    return 'native' if device_type in native_device_types() else 'reference'


def choose_cuda_kernels(forced: str, native: bool, triton_imports: Callable[[], bool]) -> str:
    """The kernels CUDA tensors run: ``forced`` (the value of ``DDFNET_CUDA_KERNELS``) when set, else the
    first available of native (``native``: the extension has CUDA kernels), triton, reference.

    Raises ValueError, in one line naming the available ones, for an unknown or unavailable choice.
    """
    if not forced and native:
        return 'native'  # triton is not even imported
    available = [name for name, ok in zip(CUDA_KERNELS, (native, triton_imports(), True)) if ok]
    if not forced:
        return available[0]
    if forced not in available:
        why = 'unknown' if forced not in CUDA_KERNELS else 'not available here'
        raise ValueError(f'{CUDA_KERNELS_ENV}={forced!r} is {why}; available: {", ".join(available)}')
    return forced


def native_unavailable_reason() -> str:
    """Why no native kernel was loaded ('' when one was)."""
    return _no_extension_reason


def _warn_slow_path(device_type: str) -> None:
    if device_type in _warned:
        return
    _warned.add(device_type)
    if _extension is None:
        why = _no_extension_reason
    else:
        why = f'the native kernels were built for {", ".join(native_device_types())} only'
        if device_type == 'cuda':
            why += ('; reinstall with DDFNET_BUILD_CUDA=1, and CUDA_HOME a CUDA toolkit of torch\'s CUDA major '
                    f'version {torch.version.cuda}, for the CUDA kernels')
    warnings.warn(f'ddfnet: no native DDF kernel for device type {device_type!r} ({why}); using the '
                  'pure-PyTorch reference implementation (correct, but slower).',
                  DDFSlowPathWarning, stacklevel=3)


def _ddf_reference_kernel(input, channel_filter, spatial_filter, kernel_size, dilation, stride, kernel_combine):
    check_ddf_args(input, channel_filter, spatial_filter, kernel_size, dilation, stride, kernel_combine)
    _warn_slow_path(input.device.type)
    return ddf_forward_reference(input, channel_filter, spatial_filter, kernel_size, dilation, stride,
                                 kernel_combine)


def _ddf_backward_reference_kernel(grad_output, input, channel_filter, spatial_filter, kernel_size, dilation,
                                   stride, kernel_combine):
    _warn_slow_path(input.device.type)
    return ddf_backward_reference(grad_output, input, channel_filter, spatial_filter, kernel_size, dilation,
                                  stride, kernel_combine)


def _ddf_fake(input, channel_filter, spatial_filter, kernel_size, dilation, stride, kernel_combine):
    check_ddf_args(input, channel_filter, spatial_filter, kernel_size, dilation, stride, kernel_combine)
    return new_output(input, output_size(input.shape[2], stride), output_size(input.shape[3], stride),
                      input.dtype)


def _ddf_backward_fake(grad_output, input, channel_filter, spatial_filter, kernel_size, dilation, stride,
                       kernel_combine):
    return torch.empty_like(input), torch.empty_like(channel_filter), torch.empty_like(spatial_filter)


def _ddf_flops(input_shape, channel_filter_shape, spatial_filter_shape, kernel_size, dilation, stride,
               kernel_combine, out_shape=None, **kwargs) -> int:
    # Per output element and tap: one op to combine the two filters, one multiply, one add = 3 FLOPs
    # (1.5 MACs). Counting only the multiply-add, B*C*Ho*Wo*k*k MACs (0.012 GMACs for ddf_resnet50's DDF
    # ops), would give 2 FLOPs.
    batch, channels = input_shape[:2]
    return 3 * batch * channels * out_shape[2] * out_shape[3] * kernel_size * kernel_size


def _ddf_backward_flops(grad_output_shape, input_shape, *args, out_shape=None, **kwargs) -> int:
    # Three gradients, each one combine + one multiply-add per output element and tap.
    kernel_size = args[2]
    batch, channels, out_h, out_w = grad_output_shape
    return 3 * 3 * batch * channels * out_h * out_w * kernel_size * kernel_size


def _register_flop_formula(op, formula) -> None:
    wrapped = flop_counter.register_flop_formula(op)(formula)
    # torch 2.4 files the formula under the op's overloads while FlopCounterMode looks it up by the
    # overload packet; file it under the packet too so the op is counted on every supported torch.
    flop_counter.flop_registry.setdefault(op, wrapped)


def _autocast_ddf(key_name: str):
    """The autocast rule at the dispatcher, for callers that reach the op without :func:`ddfnet.ddf`.

    TorchScript, FX graphs and exported programs call ``torch.ops.ddfnet.ddf`` directly. Without this, such
    a call under autocast would get mixed dtypes (a conv's float16 output, a float32 parameter's product)
    and raise, or run in float32 where eager runs in the autocast dtype. The kernel casts, then calls the
    op below autocast.
    """
    def autocast_ddf(input, channel_filter, spatial_filter, kernel_size, dilation, stride, kernel_combine):
        input, channel_filter, spatial_filter = autocast_inputs(input, channel_filter, spatial_filter)
        with _torch_internals.excluding_key(key_name):
            return torch.ops.ddfnet.ddf.default(input, channel_filter, spatial_filter, kernel_size, dilation,
                                                stride, kernel_combine)
    return autocast_ddf


def _without_keyset(kernel):
    return lambda _keyset, *args: kernel(*args)


def _register_vmap(kernels: torch.library.Library, name: str, rule) -> None:
    """``torch.library.register_vmap`` (torch >= 2.5). Before it, the operators called directly under vmap
    raise, at the dispatch key the rule would occupy; :func:`ddfnet.ddf` under vmap needs no registration
    (its autograd.Function has the rule, which torch has supported since 2.0)."""
    if hasattr(torch.library, 'register_vmap'):
        torch.library.register_vmap(f'{kernels.ns}::{name}', rule)
        return

    def unsupported(*args, **kwargs):
        raise RuntimeError(f'torch.ops.{kernels.ns}.{name} called directly under vmap needs torch >= 2.5 '
                           f'(torch.library.register_vmap; this is torch {torch.__version__}); ddfnet.ddf '
                           'supports vmap on this torch too')
    kernels.impl(name, unsupported, 'FuncTorchBatched')


def register_all() -> None:
    """Load the native kernels and register every kernel, rule and formula of the two operators.

    ``ddfnet/ops/__init__.py`` calls it once; the steps run in the order they need (the schemas first).
    A second call does nothing.
    """
    global _extension, _no_extension_reason, _cuda_kernels
    if _libraries:
        return
    # 1. Schemas and native kernels: the extension's TORCH_LIBRARY, or the same schemas from Python.
    _extension, _no_extension_reason = _native.load()
    # DDFNET_FORCE_REFERENCE=1 means the reference everywhere (the tests' oracle), unless CUDA is told otherwise.
    forced = os.environ.get(CUDA_KERNELS_ENV, '').strip() or ('reference' if _native.force_reference() else '')
    _cuda_kernels = choose_cuda_kernels(forced, _extension is not None and bool(_extension.with_cuda),
                                        triton_ddf.available)
    if _extension is None:
        definitions = torch.library.Library('ddfnet', 'DEF')
        for schema in SCHEMAS.values():
            definitions.define(schema)
        _libraries.append(definitions)
    kernels = torch.library.Library('ddfnet', 'IMPL')
    _libraries.append(kernels)
    ddf_op, ddf_backward_op = torch.ops.ddfnet.ddf, torch.ops.ddfnet.ddf_backward

    # 2. The reference for devices without a native kernel (all of them without the extension), at the
    # CompositeExplicitAutograd key: backend kernels registered in C++ take precedence over it.
    kernels.impl('ddf', _ddf_reference_kernel, 'CompositeExplicitAutograd')
    kernels.impl('ddf_backward', _ddf_backward_reference_kernel, 'CompositeExplicitAutograd')
    # CUDA tensors: the Triton kernels, or the reference in place of native ones (DDFNET_CUDA_KERNELS).
    cuda = {'triton': (triton_ddf.forward, triton_ddf.backward),
            'reference': (_ddf_reference_kernel, _ddf_backward_reference_kernel)}.get(_cuda_kernels)
    if cuda is not None and (_cuda_kernels == 'triton' or 'cuda' in native_device_types()):
        with warnings.catch_warnings():  # torch's "overriding a previously registered kernel" for csrc/cuda's
            warnings.simplefilter('ignore')
            kernels.impl('ddf', cuda[0], 'CUDA')
            kernels.impl('ddf_backward', cuda[1], 'CUDA')

    # 3. Fake kernels: shapes, dtypes and strides for torch.compile, torch.export and meta tensors.
    torch.library.register_fake('ddfnet::ddf', _ddf_fake)
    torch.library.register_fake('ddfnet::ddf_backward', _ddf_backward_fake)

    # 4. Autograd (reverse and forward mode) and vmap; see ddfnet.ops.autograd.
    for name, kernel in autograd_kernels().items():
        kernels.impl(name, kernel, 'Autograd', with_keyset=True)
    for name, rule in operator_vmap_rules().items():
        _register_vmap(kernels, name, rule)

    # 5. FLOP formulas, for torch.utils.flop_counter (ddfnet.models.count_macs counts models with it).
    _register_flop_formula(ddf_op, _ddf_flops)
    _register_flop_formula(ddf_backward_op, _ddf_backward_flops)

    # 6. Autocast, CPU and CUDA. torch.library.register_autocast would cast to a dtype fixed here; the
    # rule follows the autocast dtype of the moment.
    for device_type in ('cpu', 'cuda'):
        key_name = _torch_internals.autocast_key_name(device_type)
        autocast_ddf = _autocast_ddf(key_name)
        kernels.impl('ddf', _without_keyset(autocast_ddf), key_name, with_keyset=True)
        # Tracing (torch.compile, torch.export) runs the Python dispatcher, which looks there instead.
        _torch_internals.register_python_dispatcher_kernel(ddf_op.default, key_name, autocast_ddf)

    # 7. ONNX: the TorchScript exporter's symbolic (the dynamo exporter's translation is passed per export).
    register_torchscript_symbolic()
