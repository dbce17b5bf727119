"""Registers a Python function that launches Triton kernels as a torch op.

On the GPU it is a `torch.library.triton_op` whose kernels are launched through
`wrap_triton`, so torch.compile sees (and can fuse around) the kernels. Under the CPU
interpreter (TRITON_INTERPRET=1, testing only) the kernels cannot be traced with fake
tensors, so the function becomes an opaque `torch.library.custom_op` instead. Both get the
given fake impl, so shapes propagate without running anything.
"""
from torch.library import custom_op, triton_op, wrap_triton

from dcvit_engine.ops.dispatch import triton_interpreting

_INTERPRETING = triton_interpreting()


def _launch_directly(kernel):
    return kernel


# What the op body wraps each kernel with before `kernel[grid](...)`.
KERNEL_LAUNCHER = _launch_directly if _INTERPRETING else wrap_triton


def triton_kernel_op(qualname: str, fake, mutates_args=()):
    """Decorator: register `fn` (typed signature, launching via KERNEL_LAUNCHER) as `qualname`."""

    def register(fn):
        define = custom_op if _INTERPRETING else triton_op
        op = define(qualname, mutates_args=mutates_args)(fn)
        op.register_fake(fake)
        return op

    return register
