"""Every Python snippet of README.md and docs/*.md runs as written.

The snippets of one page run in order in one namespace, as a reader running the page top
to bottom would, in a fresh folder, on the real CIFAR-10 (``KLAYER_DATA``; pages define
their data with ``klayer.data.load_cifar10(subset=...)``, ``load_data`` or a small run of
their own). A page whose snippets import PyTorch or onnxruntime needs them (a failure
under CI, see conftest). The pages' command lines are checked by
tests/test_readme_commands.py.
"""

from __future__ import annotations

import re

import pytest

from conftest import REPO_ROOT, onnx_or_skip, torch_or_skip

PYTHON = re.compile(r"^```python\n(.*?)^```", re.M | re.S)
PAGES = [REPO_ROOT / "README.md", *sorted((REPO_ROOT / "docs").glob("*.md"))]


def snippets(page) -> list[str]:
    """The page's ```python blocks, in order."""
    return PYTHON.findall(page.read_text(encoding="utf-8"))


WITH_SNIPPETS = [page for page in PAGES if snippets(page)]


def test_the_pages_have_snippets():
    """The collection itself: a broken pattern would make every page pass with nothing."""
    names = {page.name for page in WITH_SNIPPETS}
    assert {"model.md", "training.md", "export.md", "population.md"} <= names
    assert sum(len(snippets(page)) for page in WITH_SNIPPETS) >= 10


@pytest.mark.cifar
@pytest.mark.parametrize("page", WITH_SNIPPETS, ids=[p.name for p in WITH_SNIPPETS])
def test_page_snippets_run(page, cifar_dir, tmp_path, monkeypatch, capsys):
    code = snippets(page)
    text = "\n".join(code)
    if re.search(r"^\s*(import|from) torch\b", text, re.M):
        torch_or_skip()
    if re.search(r"^\s*import onnxruntime\b", text, re.M):
        onnx_or_skip()
    monkeypatch.setenv("KLAYER_DATA", str(cifar_dir))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))  # never the user's
    monkeypatch.setenv("MPLBACKEND", "Agg")
    monkeypatch.chdir(tmp_path)
    namespace = {"__name__": f"snippets of {page.name}"}
    for i, block in enumerate(code, start=1):
        try:
            exec(compile(block, f"{page.name}, python block {i}", "exec"), namespace)
        except Exception as exc:  # noqa: BLE001 - reported with the page and the block
            pytest.fail(f"{page.relative_to(REPO_ROOT)}, python block {i} raises "
                        f"{type(exc).__name__}: {exc}")
    assert capsys.readouterr().out  # every page's snippets print what they show
