"""vericar: open-world vehicle information retrieval (see README.md)."""

from .allocator import reuse_freed_memory

reuse_freed_memory()  # glibc only; VERICAR_MALLOC=default opts out (vericar/allocator.py says why)
