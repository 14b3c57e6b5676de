"""The one time loop every cell runs through (:mod:`xlstm.engine.loop`). It names no cell and
imports no accelerator: it asks :mod:`xlstm.accel.registry` for compiled loops."""
