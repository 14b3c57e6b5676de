"""The README's Python examples run as written (the CuPy one needs a GPU and is skipped)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"
BLOCKS = re.findall(r"```python\n(.*?)```", README.read_text(encoding="utf-8"), flags=re.S)


def test_readme_has_examples():
    assert len(BLOCKS) >= 3


@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_readme_example_runs(index, tmp_path, monkeypatch):
    code = BLOCKS[index]
    if "import cupy" in code:
        pytest.importorskip("cupy", reason="the CuPy example needs cupy and a GPU")
    monkeypatch.chdir(tmp_path)
    namespace = {}
    exec(compile("\n".join(BLOCKS[: index + 1]) if "cupy" in code else code,
                 f"README block {index}", "exec"), namespace)
    if "result" in namespace:  # the training example must learn
        history = namespace["result"].history
        assert history[-1] < 0.5 * history[0]
        assert (tmp_path / "model.npz").exists()
