"""The README's code runs as written, and CI runs the README's test command."""
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / 'README.md'


def _python_blocks() -> list[str]:
    return re.findall(r'```python\n(.*?)```', README.read_text(), re.S)


def test_quick_start_runs():
    namespace: dict = {}
    exec(compile(_python_blocks()[0], str(README), 'exec'), namespace)
    assert namespace['out'].shape == (2, 64, 29, 29)
    assert namespace['logits'].shape == (2, 1000)


def test_dynamic_conv_example_runs():
    block = next(b for b in _python_blocks() if 'DynamicConv2d' in b)
    namespace: dict = {}
    exec(compile(block, str(README), 'exec'), namespace)
    assert namespace['y'].shape == (8, 128, 28, 28)
    assert float(namespace['layer'].temperature) == 30.0


def test_ci_runs_the_readme_test_command():
    text = README.read_text()
    assert 'make test' in text
    assert re.search(r'^make test\b', (ROOT / '.ci' / 'run').read_text(), re.M)
    # The Makefile's test target is the plain pytest command the README documents.
    makefile = (ROOT / 'Makefile').read_text()
    assert re.search(r'^test:.*\n\t.*-m pytest -q tests', makefile, re.M)
    assert 'python -m pytest -q tests' in text
