"""The docs' code runs as written, and every relative link in README.md and docs/ reaches a file and heading.

README.md's own blocks are run by test_readme.py (quick start, DynamicConv2d) and test_onnx.py (export).
"""
import re
from pathlib import Path

import pytest
import timm
import torch

import ddfnet  # noqa: F401  (registers the models)

ROOT = Path(__file__).resolve().parents[1]
DOCS = sorted((ROOT / 'docs').rglob('*.md'))
PAGES = [ROOT / 'README.md', *DOCS]


def _python_blocks(path: Path) -> list[str]:
    return re.findall(r'```python\n(.*?)```', path.read_text(), re.S)


# Blocks that compile or export take 10-20 s on two cores: the slow tier (make test-all) runs them.
DOC_BLOCKS = [pytest.param(path, i, id=f'{path.relative_to(ROOT)}[{i}]',
                           marks=[pytest.mark.slow] if re.search(r'torch\.(compile|export)', block) else [])
              for path in DOCS for i, block in enumerate(_python_blocks(path))]

# Weights files the examples name: a release-style bare state_dict and a train.py-style checkpoint dict.
RELEASE_FILE = 'ddf_mul_resnet50.pth'
DEMO_CHECKPOINT = 'output/demo/best.pth.tar'


def _write_weights(block: str, folder: Path) -> dict[str, dict[str, torch.Tensor]]:
    written = {}
    if RELEASE_FILE in block:
        written[RELEASE_FILE] = timm.create_model('ddf_mul_resnet50').state_dict()
        torch.save(written[RELEASE_FILE], folder / RELEASE_FILE)
    if DEMO_CHECKPOINT in block:
        written[DEMO_CHECKPOINT] = timm.create_model('ddf_resnet26', num_classes=8).state_dict()
        (folder / DEMO_CHECKPOINT).parent.mkdir(parents=True)
        torch.save({'state_dict': written[DEMO_CHECKPOINT], 'epoch': 7}, folder / DEMO_CHECKPOINT)
    return written


@pytest.mark.skipif(not DOC_BLOCKS, reason='no python blocks in docs/')
@pytest.mark.parametrize('path, index', DOC_BLOCKS)
def test_docs_python_blocks_run(path, index, tmp_path, monkeypatch):
    block = _python_blocks(path)[index]
    written = _write_weights(block, tmp_path)
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    # A block must show something that can fail: it loads weights (checked below) or asserts.
    assert written or re.search(r'^\s*assert ', block, re.M), f'{path.name} block {index} checks nothing'
    exec(compile(block, str(path), 'exec'), namespace)
    if written:
        # The examples load weights: the model they end with holds the file's tensors, classifier included.
        model_state = namespace['model'].state_dict()
        state = written[DEMO_CHECKPOINT if DEMO_CHECKPOINT in written else RELEASE_FILE]
        assert model_state.keys() == state.keys()
        assert all(torch.equal(model_state[k], state[k]) for k in state)


def _anchors(page: Path) -> set[str]:
    """GitHub's heading anchors: lower case, punctuation other than '-' and '_' dropped, spaces to '-'."""
    text = re.sub(r'```.*?```', '', page.read_text(), flags=re.S)
    return {re.sub(r'[^\w\- ]', '', h.strip().lower()).replace(' ', '-')
            for h in re.findall(r'^#+ (.*)$', text, re.M)}


def test_relative_links_reach_a_file_and_heading():
    broken = []
    for page in PAGES:
        text = re.sub(r'```.*?```', '', page.read_text(), flags=re.S)
        for target in re.findall(r'\]\(([^)\s]+)\)', text):
            if re.match(r'[a-z]+:', target):
                continue  # http(s) links are not checked offline
            file, _, anchor = target.partition('#')
            dest = (page.parent / file).resolve() if file else page
            if not dest.exists():
                broken.append(f'{page.relative_to(ROOT)}: {target} (no such file)')
            elif anchor and (dest.suffix != '.md' or anchor not in _anchors(dest)):
                broken.append(f'{page.relative_to(ROOT)}: {target} (no such heading)')
    assert not broken, '\n'.join(broken)
    assert len(PAGES) >= 6  # README, design, models, training, distributed, deployment, benchmarks, slurm
