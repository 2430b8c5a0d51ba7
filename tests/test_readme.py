"""The README's code runs as written, and the test commands it names are the Makefile's: `make test` the fast
tier, `make test-all` everything, which is what CI runs."""
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


def test_ci_runs_everything_and_make_test_is_the_fast_tier():
    text = README.read_text()
    assert re.search(r'\bmake test\b(?!-)', text)
    assert re.search(r'^make test-all\b', (ROOT / '.ci' / 'run').read_text(), re.M)
    makefile = (ROOT / 'Makefile').read_text()
    assert re.search(r'^test: setup\n\t\$\(BIN\)/python -m pytest -q -m "not slow" tests$', makefile, re.M)
    # test-all: pytest on the whole tests folder, no mark expression (everything).
    recipe = re.search(r'^test-all: setup.*\n((?:\t.*\n)+)', makefile, re.M)[1].replace('\\\n', ' ')
    assert re.search(r'-m pytest -q\b.*\stests\s', recipe) and not re.search(r'\s-m ["\']', recipe), recipe
