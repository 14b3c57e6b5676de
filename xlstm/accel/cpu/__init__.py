"""The whole-loop CPU kernels: the engine's step recorded and replayed under numba, calling
numpy's own BLAS and ufunc loops (``native``)."""
