"""Where the Triton kernels run and how big their blocks are: shared by the kernel wrappers.

Triton runs on CUDA tensors, or on CPU tensors under TRITON_INTERPRET=1 (the interpreter runs
each program as numpy code: it wants few, large blocks, so CPU tensors get their own sizes).
"""

from __future__ import annotations

import contextlib
import functools
import math
import os

import torch


def interpreting() -> bool:
    """TRITON_INTERPRET=1: kernels run in Triton's CPU interpreter."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def check_device(device: torch.device) -> None:
    if device.type != "cuda" and not interpreting():
        raise ValueError(
            f"the Triton kernels need CUDA tensors (got {device}); use kernel='torch', or set "
            "TRITON_INTERPRET=1 to run them on CPU (slow, for tests)"
        )


def on_device(device: torch.device) -> contextlib.AbstractContextManager:
    """Where to launch a kernel on `device`'s tensors: Triton launches on the current CUDA device,
    not the tensors' (model parallel, parallelize=True, spreads the layers over GPUs), so a CUDA
    device is made the current one; CPU tensors (the interpreter) need nothing."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def launches_on_input_device(wrapper):
    """Decorator of a kernel wrapper whose first argument is a tensor: every launch in it goes to
    that tensor's device (on_device)."""

    @functools.wraps(wrapper)
    def run(first: torch.Tensor, *args, **kwargs):
        with on_device(first.device):
            return wrapper(first, *args, **kwargs)

    return run


def interpreter_sizes(device: torch.device) -> bool:
    """Whether to size blocks for the interpreter (CPU tensors) rather than for a GPU."""
    return device.type != "cuda"


def num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 1


def pow2(n: int) -> int:
    """The smallest power of two >= n (1 for n <= 1)."""
    return 1 << max(0, math.ceil(math.log2(max(1, n))))
