"""What every part of xlstm stands on: the one importer of array-api-compat (``compat``),
argument checks, type aliases and parameter trees. Nothing here imports the rest of xlstm."""
