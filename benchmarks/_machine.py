"""The machine and the array library of a run: backend, device and CPU names, library
versions, BLAS threads and the environment variables that the timings depend on.

Nothing here imports numpy at module level: ``set_threads`` must run before the first
numpy import, or the BLAS will not see the thread counts.
"""

from __future__ import annotations

import os
import platform
import re
import sys

THREAD_VARS = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")
ENV_VARS = (*THREAD_VARS, "OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE", "XLSTM_ACCEL",
            "CUDA_VISIBLE_DEVICES")  # fmt: skip


class Backend:
    """The array library of ``--backend``: namespace, device, host transfers and sync."""

    def __init__(self, name, dtype):
        import array_api_compat

        self.name, self.dtype_name, self.gpu, self.device = name, dtype, False, None
        self.sync, self.device_name = lambda: None, cpu_name()
        if name == "cupy":
            import cupy as mod

            self.gpu, self.sync = True, lambda: mod.cuda.Device().synchronize()
            self.device_name = mod.cuda.runtime.getDeviceProperties(0)["name"].decode()
        elif name == "torch":
            import torch as mod

            if mod.cuda.is_available():
                self.gpu, self.device, self.sync = True, "cuda", mod.cuda.synchronize
                self.device_name = mod.cuda.get_device_name(0)
        else:
            import numpy as mod
        self.mod = mod
        self.xp = array_api_compat.array_namespace(mod.empty(0))
        self.dtype = getattr(self.xp, dtype)

    def asarray(self, host):
        return self.xp.asarray(host.astype(self.dtype_name), device=self.device)

    @staticmethod
    def to_host(arr):
        import numpy as np

        if hasattr(arr, "detach"):
            return arr.detach().cpu().numpy()
        return arr.get() if hasattr(arr, "get") else np.asarray(arr)


def cpu_name():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def slug(text):
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "unknown"


def versions():
    """Versions of Python and of the libraries this run imported."""
    out = {"python": platform.python_version()}
    for mod in ("numpy", "xlstm", "array_api_compat", "numba", "torch", "cupy", "matplotlib"):
        if mod in sys.modules:
            out[mod] = getattr(sys.modules[mod], "__version__", "unknown")
    return out


def environment():
    """The variables of ``ENV_VARS`` that are set, as found."""
    return {k: os.environ[k] for k in ENV_VARS if k in os.environ}


def set_threads(n):
    """Set the thread-count variables to ``n``; call before the first numpy import."""
    for var in THREAD_VARS:
        os.environ[var] = str(n)


def thread_info(requested, torch):
    """Threads asked for, given to the BLAS and to torch, and threadpoolctl's view if any."""
    threads = {"requested": requested, "blas_env": requested,
               "torch": torch.get_num_threads() if torch is not None else None}  # fmt: skip
    try:
        from threadpoolctl import threadpool_info

        threads["threadpoolctl"] = [  # without file paths, which name this machine
            {k: v for k, v in lib.items() if k != "filepath"} for lib in threadpool_info()
        ]
    except ImportError:
        pass
    return threads


def load_average():
    """The 1, 5 and 15 minute load averages, or None where the system has none."""
    return os.getloadavg() if hasattr(os, "getloadavg") else None
