"""Every Triton launch of the kernels goes through :func:`launch`, so that :func:`compile_recorded`
can compile, for a GPU architecture and without a GPU, exactly what a real launch would compile.

A real launch specialises its arguments before compiling: an integer equal to 1 becomes a
compile-time constant (a unit stride, which lets Triton vectorise the loads along it), integers and
pointers divisible by 16 are marked so, heuristics pick constexprs (``EVEN_K``...) and the autotuner
adds its tile sizes. :func:`compile_recorded` replays the recorded arguments through Triton's own
specialisation code (the launcher's binder), so its signature is the launcher's, not a guess.
"""
from __future__ import annotations

import contextlib
import os
import re
import shutil
import subprocess
import tempfile

import triton

# Triton picks its interpreter when it decorates a kernel, i.e. when a kernel module is first imported.
INTERPRET = os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")
_RECORDING = None


def launch(kernel, grid, *args, **kwargs) -> None:
    """``kernel[grid](*args, **kwargs)``, or record the call inside :func:`recording`."""
    if _RECORDING is not None:
        _RECORDING.append((kernel, args, kwargs))
        return
    kernel[grid](*args, **kwargs)


@contextlib.contextmanager
def recording():
    """Record launches instead of running them (the launch wrappers may then get ``meta`` tensors)."""
    global _RECORDING
    previous, _RECORDING = _RECORDING, []
    try:
        yield _RECORDING
    finally:
        _RECORDING = previous


def _jit_function(kernel):
    fn = kernel
    while not isinstance(fn, triton.runtime.JITFunction):
        fn = fn.fn
    return fn


def _heuristics(kernel):
    """The ``@triton.heuristics`` values of an autotuned kernel (name -> function of the args)."""
    values, fn = {}, kernel
    while not isinstance(fn, triton.runtime.JITFunction):
        if isinstance(fn, triton.runtime.Heuristics):
            values.update(fn.values)
        fn = fn.fn
    return values


def compile_recorded(kernel, args, kwargs, capability: int, all_configs: bool = False):
    """Compile one recorded launch for ``sm_<capability>``: every autotune configuration (or the
    first), specialised like the launcher does. Yields ``(config kwargs, compiled kernel)``."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend
    from triton.runtime.jit import create_function_from_signature

    jit_fn = _jit_function(kernel)
    target = GPUTarget("cuda", capability, 32)
    backend = make_backend(target)
    binder = create_function_from_signature(jit_fn.signature, jit_fn.params, backend)
    configs = getattr(kernel, "configs", [None])
    for config in (configs if all_configs else configs[:1]):
        kw = dict(kwargs, **(config.all_kwargs() if config is not None else {}))
        named = dict(zip(jit_fn.arg_names, args), **kw)
        for name, heuristic in _heuristics(kernel).items():
            kw[name] = named[name] = heuristic(named)
        bound, specialization, options = binder(*args, **kw)
        # Triton-internal (3.9): the launcher's own packing of signature, constexprs and attributes.
        options, signature, constexprs, attrs = jit_fn._pack_args(backend, kw, bound, specialization, options)
        source = ASTSource(fn=jit_fn, signature=signature, constexprs=constexprs, attrs=attrs)
        yield kw, triton.compile(source, target=target, options=options.__dict__)


def _cuobjdump():
    bundled = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    return bundled if os.path.exists(bundled) else shutil.which("cuobjdump")


def resource_usage(cubin: bytes) -> dict:
    """Registers, stack, local memory (spills) and static shared memory per thread / block of a
    cubin, from ``cuobjdump -res-usage``; empty when cuobjdump is not available."""
    tool = _cuobjdump()
    if tool is None:
        return {}
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        text = subprocess.run([tool, "-res-usage", f.name], capture_output=True, text=True,
                              timeout=60).stdout
    usage = dict(re.findall(r"\b(REG|STACK|LOCAL|SHARED):(\d+)", text))
    return {k.lower(): int(v) for k, v in usage.items()}
