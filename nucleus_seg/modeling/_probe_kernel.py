"""The one-line Triton kernel :mod:`.triton_support` runs once per GPU before trusting Triton there (imported only
where Triton is installed)."""

import triton
import triton.language as tl

__all__ = ["add_one"]


@triton.jit
def add_one(x_ptr):
    tl.store(x_ptr, tl.load(x_ptr) + 1.0)
