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
            "CUDA_VISIBLE_DEVICES", "CUPY_TF32", "NVIDIA_TF32_OVERRIDE")  # fmt: skip


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


#: torch's switches of the FP32 precision from 2.9 on (``"ieee"`` or ``"tf32"``), each under
#: ``torch.backends``: cuDNN's RNNs (``nn.LSTM``, ``nn.GRU``), its convolutions and the
#: matmuls. Earlier versions have only the legacy ``allow_tf32`` switches.
FP32_PRECISION = ("cudnn.rnn", "cudnn.conv", "cuda.matmul")
#: torch's legacy TF32 switches, under ``torch.backends``.
ALLOW_TF32 = ("cudnn", "cuda.matmul")


def _backend(torch, path):
    """``torch.backends.<path>``, or None where this torch has no such switch group."""
    obj = torch.backends
    for name in path.split("."):
        obj = getattr(obj, name, None)
    return obj


def set_tf32(torch, on):
    """Allow TF32 in torch's FP32 work (cuDNN and matmuls) or not, through every switch this
    torch has: the legacy ``allow_tf32`` ones first, then the ``fp32_precision`` ones of
    torch 2.9+ (which torch 2.9+ reads), all set alike, so that no mix of the two APIs is
    left (torch refuses to read a mixed state). CuPy reads ``CUPY_TF32`` at import: set it
    in the environment before."""
    for path in ALLOW_TF32:
        obj = _backend(torch, path)
        if obj is not None and hasattr(obj, "allow_tf32"):
            obj.allow_tf32 = bool(on)
    for path in FP32_PRECISION:
        obj = _backend(torch, path)
        if obj is not None and hasattr(obj, "fp32_precision"):
            obj.fp32_precision = "tf32" if on else "ieee"


def tf32_state(torch):
    """Whether TF32 may run, as every switch reads at the start of the run: CuPy's
    (``CUPY_TF32``, off unless set to 1), torch's legacy ``allow_tf32`` and its
    ``fp32_precision`` switches where this torch has them (each under its full name), and
    ``torch.get_float32_matmul_precision()``; a switch that torch refuses to read (a mix of
    the two APIs) is recorded as its error."""
    out = {"CUPY_TF32": os.environ.get("CUPY_TF32", "0") == "1"}
    if torch is None:
        return out
    for paths, attr in ((ALLOW_TF32, "allow_tf32"), (FP32_PRECISION, "fp32_precision")):
        for path in paths:
            obj = _backend(torch, path)
            if obj is None or not hasattr(type(obj), attr) and not hasattr(obj, attr):
                continue
            try:
                out[f"torch.backends.{path}.{attr}"] = getattr(obj, attr)
            except RuntimeError as exc:  # torch 2.9+: a mix of the legacy and new APIs
                out[f"torch.backends.{path}.{attr}"] = f"unreadable: {exc}"
    out["torch.get_float32_matmul_precision"] = torch.get_float32_matmul_precision()
    return out


def gpu_info(torch):
    """The device name and cuDNN version that torch sees, or ``{}`` without a CUDA device."""
    if torch is None or not torch.cuda.is_available():
        return {}
    return {"torch_device": torch.cuda.get_device_name(0),
            "cudnn": torch.backends.cudnn.version()}


def blas_kernel(threads):
    """The BLAS libraries and the kernels they run, from threadpoolctl's view in
    ``thread_info``: ``"openblas 0.3.31 SkylakeX, 2 threads"``, or why it is unknown."""
    libs = [lib for lib in threads.get("threadpoolctl", []) if lib.get("user_api") == "blas"]
    if "threadpoolctl" not in threads:
        return "unknown (threadpoolctl is not installed)"
    return "; ".join(f"{lib['internal_api']} {lib['version']} {lib.get('architecture') or ''}"
                     f", {lib['num_threads']} threads".replace(" ,", ",") for lib in libs) \
        or "none found"


def load_average():
    """The 1, 5 and 15 minute load averages, or None where the system has none."""
    return os.getloadavg() if hasattr(os, "getloadavg") else None


def cpu_machine(**extra):
    """The machine of a CPU run, for a report's JSON: CPU, BLAS kernel and threads, the
    environment variables that the timings depend on, and the load at the end."""
    threads = thread_info(None, None)
    return {"device": f"CPU: {cpu_name()}", **extra, "blas": blas_kernel(threads),
            "threads": threads, "environment": environment(), "load_average": load_average()}


def write_cpu_report(folder, name, report, title, table):
    """``<folder>/<name>_<cpu>.json`` (``report``) and ``.md``: ``title``, a line naming
    the machine and BLAS, then the Markdown lines ``table``; returns the common stem."""
    import json
    from pathlib import Path

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    stem = folder / f"{name}_{slug(cpu_name())[:24]}"
    stem.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    machine = report["machine"]
    cores = f", {machine['cores']} cores" if "cores" in machine else ""
    lines = [title, "", f"{machine['device']}{cores} | BLAS {machine['blas']} | environment "
             f"{machine['environment'] or 'no thread or BLAS variables set'}", "", *table]
    stem.with_suffix(".md").write_text("\n".join(lines) + "\n", encoding="utf-8")
    print(f"wrote {stem}.json, {stem}.md")
    return stem
