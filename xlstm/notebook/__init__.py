"""The two notebooks' functional APIs: the LSTM's (``lstm_*``, its parameter dict, softmax
head, losses, torch conversion and autodiff wrappers) and the RNN's (``rnn_*``).

Their public names are exported by :mod:`xlstm`; the old module paths (``xlstm.lstm``,
``xlstm.params``, ...) keep working.
"""
