"""Autodiff through xlstm's hand-written backward passes, for torch and JAX.

* :func:`lstm`: the notebook LSTM's hidden states (:func:`xlstm.lstm_forward`) as a
  ``jax.custom_vjp`` and a ``torch.autograd.Function`` whose backward pass is
  :func:`xlstm.lstm_backward` (:mod:`xlstm.notebook.autodiff`);
* :func:`torch_module`: any model class as a ``torch.nn.Module`` whose backward pass is the
  model's :meth:`backward` (:mod:`xlstm.models.autodiff`);
* :func:`jax_function`: any model class as a ``jax.custom_vjp`` function of its parameters.

Neither torch nor JAX is imported before one of these is called.
"""

from .models.autodiff import jax_function, torch_module
from .notebook.autodiff import lstm

__all__ = ["lstm", "torch_module", "jax_function"]
