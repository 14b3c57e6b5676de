"""The implementations being timed, at one size: xlstm (with and without its accelerator),
the notebook's per-step code, torch.nn.LSTM and the workload's GEMMs alone; and the flops of
the workload."""

from __future__ import annotations

from _lstm_seed import SeedLSTM

N_Y = 10
#: Models beyond the single LSTM layer, each timed as xlstm's class against the torch module
#: of the same kind with the same weights (``model.to_torch()``): name -> (class, kwargs).
MODELS = {"gru": ("GRU", {}), "bilstm2": ("LSTM", {"num_layers": 2, "bidirectional": True}),
          "slstm": ("SLSTM", {})}
#: The models of :data:`MODELS` that torch has no module for (no cuDNN twin): timed alone,
#: their time per step reported.
NO_TORCH = ("slstm",)
#: Gates per unit of each model class (its recurrent term is ``gates * n_a`` wide).
GATES = {"LSTM": 4, "GRU": 3, "SLSTM": 4}
IMPLS = ("xlstm", "xlstm-plain", "xlstm-per-step", "xlstm-persistent", "xlstm-model",
         "xlstm-lengths", "seed", "torch", "gemm",
         *(f"{side}-{name}" for name in MODELS for side in ("xlstm", "torch")
           if side == "xlstm" or name not in NO_TORCH))
#: The implementations without the softmax prediction (the LSTM core only): their flops are
#: the gate flops alone.
CORE = ("xlstm-model", "xlstm-lengths", "torch")
#: Timed only with ``--baseline PATH``: xlstm imported from another source tree (say a
#: worktree of an older revision), in its own process, for before/after ratios in one run.
BASELINE = ("xlstm-baseline", "xlstm-baseline-plain")


def flop_counts(n_x, n_a, m, T):
    gates, out = 2 * T * m * 4 * n_a * (n_a + n_x), 2 * T * m * N_Y * n_a
    return {"fwd": gates + out, "fwd_bwd": 3 * gates + out,
            "core_fwd": gates, "core_fwd_bwd": 3 * gates}  # fmt: skip


def model_flops(name, n_x, n_a, m, T):
    """The gate flops of model ``name`` (:data:`MODELS`): every layer and direction's input
    and recurrent products; backward three times forward."""
    cls, kw = MODELS[name]
    gates = GATES[cls]
    D, layers = 1 + kw.get("bidirectional", False), kw.get("num_layers", 1)
    fwd = sum(D * 2 * T * m * gates * n_a * ((n_x if k == 0 else D * n_a) + n_a)
              for k in range(layers))
    return {"fwd": fwd, "fwd_bwd": 3 * fwd}


def bench_models(be, torch, size, timed, only):
    """The :data:`MODELS` rows present in ``only``: ``xlstm-<name>`` (xlstm's class on
    ``be``) and ``torch-<name>`` (the torch module with its weights; none for
    :data:`NO_TORCH`); each names the torch row it is compared with, its own flops and its
    time per step (``us_per_step``). The check is the largest difference of the outputs
    from xlstm's array path (accelerators off) on the same weights and inputs."""
    import numpy as np

    import xlstm

    n_x, n_a, m, T = size
    res = {}
    for name, (cls, kw) in MODELS.items():
        keys = [k for k in (f"xlstm-{name}", f"torch-{name}") if k in only]
        if not keys:
            continue
        model = getattr(xlstm, cls)(n_x, n_a, **kw, xp=be.xp, dtype=be.dtype, device=be.device)
        rng = np.random.default_rng(size)  # the same inputs in every process
        x_h = 0.1 * rng.standard_normal((n_x, m, T))
        dy_h = 0.1 * rng.standard_normal((model.D * n_a, m, T))
        x, dy = be.asarray(x_h), be.asarray(dy_h)
        with xlstm.accelerators(False):
            y_ref = be.to_host(model.forward(x, return_cache=False)[0])
        desc = f"{cls}, {kw.get('num_layers', 1)} layer{'s' * (kw.get('num_layers', 1) > 1)}" + (
            ", bidirectional" if kw.get("bidirectional") else "")
        common = {"ref": f"torch-{name}", "flops": model_flops(name, *size)}
        if f"xlstm-{name}" in keys:
            accel = accelerator(be)
            res[f"xlstm-{name}"] = {
                **common, "label": f"xlstm.{cls} ({be.name}{', ' + accel if accel else ''}; {desc})",
                "fwd": timed(lambda: model.forward(x, return_cache=False)),
                "fwd_bwd": timed(lambda: model.backward(dy, model.forward(x)[2])),
                "check_max_abs_diff_a": float(np.max(np.abs(
                    be.to_host(model.forward(x, return_cache=False)[0]) - y_ref))),
            }  # fmt: skip
        if f"torch-{name}" in keys and torch is not None and (
                not be.gpu or torch.cuda.is_available()):
            res[f"torch-{name}"] = {**common, **bench_torch_model(
                torch, be.gpu, be.dtype_name, model, x_h, dy_h, timed, desc)}
            res[f"torch-{name}"]["check_max_abs_diff_a"] = float(
                np.max(np.abs(res[f"torch-{name}"].pop("a") - y_ref)))
        for key in keys:
            if key in res:
                r = res[key]
                r["us_per_step"] = {ph: 1e3 * r[ph]["median_ms"] / T for ph in ("fwd", "fwd_bwd")}
                if name in NO_TORCH:  # no ratio to show: the time per step in the table
                    r["label"] += (f"; no cuDNN twin: {r['us_per_step']['fwd']:.1f} us/step fwd, "
                                   f"{r['us_per_step']['fwd_bwd']:.1f} us/step f+b")
    return res


def accelerator(be):
    """The label of xlstm's accelerator on this backend and dtype, or None without one."""
    from xlstm.engine import loop as _engine

    return getattr(_engine.accelerated_loops(be.xp, be.dtype), "label", None)


def bench_size(be, torch, size, rng, timed, only=IMPLS):
    """Time the implementations in ``only`` at one size; returns ``{key: result dict}``."""
    import numpy as np

    import xlstm
    from xlstm.engine import loop as _engine

    n_x, n_a, m, T = size
    x_h, a0_h, da_h = (0.1 * rng.standard_normal(s) for s in ((n_x, m, T), (n_a, m), (n_a, m, T)))
    params = xlstm.init_params(n_x, n_a, N_Y, xp=be.xp, dtype=be.dtype, device=be.device, seed=0)
    p_h = {k: be.to_host(v) for k, v in params.items()}
    x, a0, da = be.asarray(x_h), be.asarray(a0_h), be.asarray(da_h)
    a_ref = be.to_host(xlstm.lstm_forward(x, a0, params, return_caches=False)[0])
    diff = lambda a: float(np.max(np.abs(be.to_host(a) - a_ref)))
    res = {}

    def xl_fwd_bwd():
        return xlstm.lstm_backward(da, xlstm.lstm_forward(x, a0, params)[3])

    def xl_result(label):
        return {"label": f"xlstm ({be.name}{', GPU' if be.gpu else ''}{label})",
                "fwd": timed(lambda: xlstm.lstm_forward(x, a0, params, return_caches=False)),
                "fwd_bwd": timed(xl_fwd_bwd)}  # fmt: skip

    accel = accelerator(be)
    for key, label in (("xlstm", ""), ("xlstm-baseline", ", baseline tree")):
        if key in only:
            res[key] = xl_result(f"{label}, {accel}" if accel else label)
        if key + "-plain" in only and accel:  # the same calls on the array path, for the gain
            with xlstm.accelerators(False):
                res[key + "-plain"] = xl_result(f"{label}, array path")
    loops = type(_engine.accelerated_loops(be.xp, be.dtype))
    if "xlstm-per-step" in only and getattr(loops, "persistent", False):
        # CuPy: the per-step kernels and cuBLAS where the persistent kernels would run
        loops.persistent = False
        try:
            res["xlstm-per-step"] = xl_result(f", {accel}, per-step kernels only")
        finally:
            loops.persistent = True
    if "xlstm-persistent" in only and getattr(loops, "persistent", False):
        # CuPy: the persistent kernels wherever they fit, whatever xlstm.accel.cuda.PERSISTENT_RULE
        # estimates: with the per-step row, the measured crossover that the rule should have
        from xlstm.accel import cuda as _cuda

        loops.rule = _cuda.PERSISTENT_WHERE_IT_FITS
        try:
            res["xlstm-persistent"] = xl_result(f", {accel}, persistent kernels where they fit")
        finally:
            loops.rule = None

    if "xlstm-model" in only or "xlstm-lengths" in only:
        res.update(bench_model(be, params, x, a0, da, rng, timed, a_ref, accel, only))
    res.update(bench_models(be, torch, size, timed, only))

    seed_mod = be.mod if be.name == "cupy" else None if be.gpu else np
    if seed_mod is not None and "seed" in only:
        seed = SeedLSTM(p_h, seed_mod)
        sx, sa0, sda = (seed_mod.asarray(v) for v in (x_h, a0_h, da_h))
        res["seed"] = {"label": f"seed-style ({seed_mod.__name__}, float64, per step)",
                       "fwd": timed(lambda: seed.forward(sx, sa0)),
                       "fwd_bwd": timed(lambda: seed.backward(sda, seed.forward(sx, sa0)[3])),
                       "check_max_abs_diff_a": diff(seed.forward(sx, sa0)[0])}  # fmt: skip

    if "torch" in only and torch is not None and (not be.gpu or torch.cuda.is_available()):
        res["torch"] = bench_torch(torch, be.gpu, be.dtype_name, p_h, x_h, a0_h, da_h, timed)
        res["torch"]["check_max_abs_diff_a"] = diff(res["torch"].pop("a"))

    if "gemm" not in only:
        return res
    r = lambda *shape: be.asarray(rng.standard_normal(shape))
    X, WxT, A, WaT, AS, WyT = (r(T * m, n_x), r(n_x, 4 * n_a), r(m, n_a), r(n_a, 4 * n_a),
                               r(T * m, n_a), r(n_a, N_Y))  # fmt: skip
    dG1, Wa, dGT, H, dG, Wx = (r(m, 4 * n_a), r(4 * n_a, n_a), r(4 * n_a, T * m),
                               r(T * m, n_a + n_x), r(T * m, 4 * n_a), r(4 * n_a, n_x))  # fmt: skip

    def gemm_fwd():
        return [X @ WxT, AS @ WyT] + [A @ WaT for _ in range(T)]

    def gemm_fwd_bwd():
        return gemm_fwd() + [dGT @ H, dG @ Wx] + [dG1 @ Wa for _ in range(T)]

    res["gemm"] = {"label": f"GEMMs only ({be.name}, same shapes)",
                   "fwd": timed(gemm_fwd), "fwd_bwd": timed(gemm_fwd_bwd)}  # fmt: skip
    return res


def bench_model(be, params, x, a0, da, rng, timed, a_ref, accel, only):
    """``xlstm.LSTM`` (one layer, the LSTM core: no prediction) with the notebook's
    parameters and initial state, without and with ``lengths`` (a padded batch, lengths
    uniform in ``[T // 2, T]``), on the same accelerator. The check compares the hidden
    states with the notebook's on the rows of full length."""
    import numpy as np

    import xlstm

    n_x, m, T = x.shape
    model = xlstm.LSTM(n_x, a0.shape[0], xp=be.xp, dtype=be.dtype, device=be.device)
    layer = model.params[0]
    layer.update((k, params[k]) for k in ("Wf", "bf", "Wi", "bi", "Wc", "bc", "Wo", "bo"))
    layer.update((k, be.xp.zeros_like(layer[k])) for k in ("bhf", "bhi", "bhc", "bho"))
    state = (a0[None, ...], be.xp.zeros_like(a0[None, ...]))
    host = rng.integers(max(1, T // 2), T + 1, size=m)
    host[0] = T  # at least one full row for the check
    res = {}
    for key, kw in (("xlstm-model", {}),
                    ("xlstm-lengths", {"lengths": be.xp.asarray(host, device=be.device)})):
        if key not in only:
            continue
        extra = f", lengths in [{int(host.min())}, {T}]" if kw else ""
        res[key] = {
            "label": f"xlstm.LSTM ({be.name}{', ' + accel if accel else ''}, LSTM core"
                     f"{extra})",
            "fwd": timed(lambda kw=kw: model.forward(x, state, **kw, return_cache=False)),
            "fwd_bwd": timed(lambda kw=kw: model.backward(da, model.forward(x, state, **kw)[2])),
        }
        rows = np.flatnonzero(host == T) if kw else np.arange(m)
        y = be.to_host(model.forward(x, state, **kw, return_cache=False)[0])
        res[key]["check_max_abs_diff_a"] = float(np.max(np.abs(y[:, rows] - a_ref[:, rows])))
    return res


def bench_torch(torch, gpu, dtype, p, x_h, a0_h, da_h, timed):
    """torch.nn.LSTM with the same parameters, inputs and upstream gradient."""
    import numpy as np

    n_x, n_a = x_h.shape[0], a0_h.shape[0]
    dev, tdt = ("cuda" if gpu else "cpu"), getattr(torch, dtype)
    tt = lambda arr: torch.tensor(arr, dtype=tdt, device=dev)
    lstm = torch.nn.LSTM(n_x, n_a).to(device=dev, dtype=tdt)
    W = np.concatenate([p["Wi"], p["Wf"], p["Wc"], p["Wo"]])  # torch's gate order: i, f, g, o
    b = np.concatenate([p["bi"], p["bf"], p["bc"], p["bo"]])[:, 0]
    with torch.no_grad():
        lstm.weight_hh_l0.copy_(tt(W[:, :n_a]))
        lstm.weight_ih_l0.copy_(tt(W[:, n_a:]))
        lstm.bias_ih_l0.copy_(tt(b))
        lstm.bias_hh_l0.zero_()
    x = tt(x_h.transpose(2, 1, 0)).requires_grad_()
    h0 = tt(a0_h.T[None]).requires_grad_()
    c0 = torch.zeros_like(h0)
    grad = tt(da_h.transpose(2, 1, 0))

    def fwd():  # what a user deploys: eval mode, no autograd
        lstm.eval()
        with torch.no_grad():
            return lstm(x, (h0, c0))[0]

    def fwd_bwd():
        lstm.train()
        lstm.zero_grad(set_to_none=True)
        x.grad = h0.grad = None
        lstm(x, (h0, c0))[0].backward(grad)

    where = "cuDNN" if gpu else f"CPU, {torch.get_num_threads()} threads"
    return {"label": f"torch.nn.LSTM ({where}, LSTM core only)", "fwd": timed(fwd),
            "fwd_bwd": timed(fwd_bwd), "a": fwd().permute(2, 1, 0)}  # fmt: skip


def bench_torch_model(torch, gpu, dtype, model, x_h, dy_h, timed, desc):
    """``model.to_torch()`` timed like :func:`bench_torch`; ``"a"`` is its output in
    xlstm's layout ``(D n_a, m, T)``, on the host."""
    dev, tdt = ("cuda" if gpu else "cpu"), getattr(torch, dtype)
    module = model.to_torch().to(device=dev, dtype=tdt)
    x = torch.tensor(x_h.transpose(2, 1, 0), dtype=tdt, device=dev).requires_grad_()
    grad = torch.tensor(dy_h.transpose(2, 1, 0), dtype=tdt, device=dev)

    def fwd():
        module.eval()
        with torch.no_grad():
            return module(x)[0]

    def fwd_bwd():
        module.train()
        module.zero_grad(set_to_none=True)
        x.grad = None
        module(x)[0].backward(grad)

    where = "cuDNN" if gpu else f"CPU, {torch.get_num_threads()} threads"
    return {"label": f"torch.nn.{type(module).__name__} ({where}; {desc})", "fwd": timed(fwd),
            "fwd_bwd": timed(fwd_bwd), "a": fwd().permute(2, 1, 0).cpu().double().numpy()}
