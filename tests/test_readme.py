"""The README's quick start runs as written."""
import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / 'README.md'


def test_quick_start_runs():
    blocks = re.findall(r'```python\n(.*?)```', README.read_text(), re.S)
    quick_start = blocks[0]
    namespace: dict = {}
    exec(compile(quick_start, str(README), 'exec'), namespace)
    assert namespace['out'].shape == (2, 64, 29, 29)
    assert namespace['logits'].shape == (2, 1000)


def test_readme_names_the_test_command():
    assert 'python -m pytest -q tests' in README.read_text()
    assert 'python -m pytest -q tests' in (README.parent / '.ci' / 'run').read_text()
