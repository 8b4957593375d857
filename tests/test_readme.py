"""The README's Python snippets run as written, in order."""
import os
import re

README = os.path.join(os.path.dirname(__file__), "..", "README.md")


def test_readme_snippets_run(monkeypatch):
    monkeypatch.chdir(os.path.join(os.path.dirname(__file__), ".."))  # paths in the README are from the root
    blocks = re.findall(r"```python\n(.*?)```", open(README, encoding="utf-8").read(), re.S)
    assert len(blocks) >= 2
    namespace = {}
    for block in blocks:
        exec(compile(block, "README.md", "exec"), namespace)
    assert tuple(namespace["out"].shape) == (5, 64)
    assert tuple(namespace["y"].shape) == (5, 2, 4)
    assert tuple(namespace["h"].shape) == (5, 64)
    assert namespace["cfg"].chimera.state_dim == 96
