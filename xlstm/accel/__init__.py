"""Optional accelerators of the engine's loop: the registry that picks one, the numba CPU loops
(``cpu/``), the CUDA kernels (``cuda/``) and JAX's ``lax.scan``. None of them is imported at the
top level of any module; any failure falls back to the array path with one warning."""
