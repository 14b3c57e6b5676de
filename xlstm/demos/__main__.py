"""``python -m xlstm.demos NAME [options]``: the same as ``python -m xlstm demo NAME``."""

from . import main

main()
