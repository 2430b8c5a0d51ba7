"""Every timm loading route works for every ddfnet model: a weights file (``pretrained_cfg_overlay``),
``checkpoint_path=``, a Hub folder (``local-dir:``) and the Hub itself (``hf-hub:``, offline through a local
cache laid out as huggingface_hub lays it out); ``clean_checkpoint.py --hf-dir`` writes that folder."""
import json
import os
import shutil
import subprocess
import sys

import pytest
import timm
import torch
from timm.models import save_for_hf

from ddfnet.cli import run_main
from support.runner import load_script, repo_env

pytestmark = pytest.mark.usefixtures('one_thread')
CLASSES = ['ant', 'bee', 'cow']
COMMIT = '0123456789abcdef0123456789abcdef01234567'


def tiny_kwargs(name):
    """Small model arguments for each family (the MobileNet is small already)."""
    return {} if 'mobilenet' in name else {'layers': [1, 1, 1, 1]}


def ddfnet_models():
    import ddfnet  # noqa: F401  (registers them)
    return sorted(timm.list_models(['ddf_*', 'dy_*']))


def logits(model):
    torch.manual_seed(1)
    with torch.no_grad():
        return model.eval()(torch.randn(1, 3, 64, 64))


@pytest.fixture(scope='module')
def published(tmp_path_factory):
    """Each model, 3 classes, saved as a weights file and as a Hub folder (also placed in a Hub cache)."""
    root = tmp_path_factory.mktemp('hub')
    out = {}
    for name in ddfnet_models():
        torch.manual_seed(0)
        model = timm.create_model(name, num_classes=3, **tiny_kwargs(name)).eval()
        torch.save({'model': model.state_dict()}, root / f'{name}.pth.tar')
        save_for_hf(model, root / name, model_config={'label_names': CLASSES},
                    model_args=dict(tiny_kwargs(name), num_classes=3), safe_serialization=True)
        snapshot = root / 'cache' / f'models--ddfnet--{name}' / 'snapshots' / COMMIT
        shutil.copytree(root / name, snapshot)
        (snapshot.parents[1] / 'refs').mkdir()
        (snapshot.parents[1] / 'refs' / 'main').write_text(COMMIT)
        out[name] = logits(model)
    return root, out


@pytest.mark.parametrize('name', ddfnet_models())
def test_file_checkpoint_path_and_local_dir_routes(name, published):
    root, expected = published
    kwargs = tiny_kwargs(name)
    routes = {
        'file': timm.create_model(name, pretrained=True, pretrained_cfg_overlay=dict(file=str(root / f'{name}.pth.tar')),
                                  **kwargs),
        'checkpoint_path': timm.create_model(name, num_classes=3, checkpoint_path=str(root / f'{name}.pth.tar'),
                                             **kwargs),
        'local-dir': timm.create_model(f'local-dir:{root / name}', pretrained=True),
    }
    for route, model in routes.items():
        assert model.num_classes == 3, route
        assert torch.equal(logits(model), expected[name]), route
    assert routes['local-dir'].pretrained_cfg['label_names'] == CLASSES


def test_hf_hub_route_offline_for_every_model(published):
    """``hf-hub:`` with HF_HUB_OFFLINE=1 reads the local cache (a fresh process: huggingface_hub reads its
    settings when imported)."""
    root, expected = published
    torch.save(expected, root / 'expected.pt')
    code = f'''
import torch, timm, ddfnet
expected = torch.load({str(root / 'expected.pt')!r})
for name in {ddfnet_models()!r}:
    model = timm.create_model(f'hf-hub:ddfnet/{{name}}', pretrained=True).eval()
    torch.manual_seed(1)
    with torch.no_grad():
        out = model(torch.randn(1, 3, 64, 64))
    assert model.num_classes == 3 and model.pretrained_cfg['label_names'] == {CLASSES!r}, name
    assert torch.equal(out, expected[name]), name
print('ok', len(expected))
'''
    env = repo_env(HF_HUB_OFFLINE='1', HF_HUB_CACHE=str(root / 'cache'), OMP_NUM_THREADS='1')
    done = subprocess.run([sys.executable, '-c', code], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == f'ok {len(ddfnet_models())}'


def test_a_file_that_is_not_weights_is_a_one_line_value_error(tmp_path):
    junk = tmp_path / 'junk.pth'
    junk.write_bytes(os.urandom(4096))
    with pytest.raises(ValueError, match=f'cannot load checkpoint {junk}: ') as error:
        timm.create_model('ddf_resnet26', pretrained=True, pretrained_cfg_overlay=dict(file=str(junk)))
    assert '\n' not in str(error.value)
    with pytest.raises(ValueError, match='holds no model.safetensors or pytorch_model.bin'):
        timm.create_model('ddf_resnet26', pretrained=True,
                          pretrained_cfg_overlay=dict(file=str(tmp_path), source='local-dir'))


def _clean_checkpoint():
    return load_script('scripts/clean_checkpoint')


def _call(argv, capsys):
    try:
        run_main(lambda: _clean_checkpoint().main(argv), 'clean_checkpoint.py')
        code = 0
    except SystemExit as e:
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err.strip().splitlines()


def test_clean_checkpoint_writes_a_hub_folder_of_a_run(tmp_path, capsys):
    """A train.py checkpoint (model name, kwargs, image settings, class names) becomes a Hub folder that
    loads with its class names and the run's image size, and gives the run's logits."""
    torch.manual_seed(0)
    model = timm.create_model('ddf_resnet26', num_classes=3, layers=[1, 1, 1, 1]).eval()
    config = {'model': 'ddf_resnet26', 'model_kwargs': {'layers': [1, 1, 1, 1]}, 'img_size': 32, 'crop_pct': 0.9,
              'interpolation': ''}
    torch.save({'model': model.state_dict(), 'model_ema': None, 'model_name': 'ddf_resnet26', 'config': config,
                'class_names': CLASSES}, tmp_path / 'best.pth.tar')
    folder = tmp_path / 'release' / 'ddf_resnet26_tiny'
    argv = ['--checkpoint', str(tmp_path / 'best.pth.tar'), '--hf-dir', str(folder)]
    code, out, err = _call(argv, capsys)  # its parent folder must exist, as for every output file
    assert code == 2 and err == [f'clean_checkpoint.py: error: cannot write --hf-dir {folder}: {folder.parent} is '
                                 'not a writable folder']
    folder.parent.mkdir()
    code, out, err = _call(argv, capsys)
    assert code == 0, err
    assert sorted(os.listdir(folder)) == ['config.json', 'model.safetensors']
    saved = json.loads((folder / 'config.json').read_text())
    assert (saved['architecture'], saved['num_classes'], saved['label_names']) == ('ddf_resnet26', 3, CLASSES)
    loaded = timm.create_model(f'local-dir:{folder}', pretrained=True)
    assert loaded.pretrained_cfg['input_size'] == (3, 32, 32) and loaded.pretrained_cfg['crop_pct'] == 0.9
    assert torch.equal(logits(loaded), logits(model))
    # a folder that holds something is replaced only with --force
    before = (folder / 'model.safetensors').read_bytes()
    code, out, err = _call(argv, capsys)
    assert code == 2 and err == [f'clean_checkpoint.py: error: {folder} is not empty: pass --force to replace it']
    assert (folder / 'model.safetensors').read_bytes() == before
    code, out, err = _call(argv + ['--force'], capsys)
    assert code == 0, err
    assert sorted(os.listdir(folder.parent)) == ['ddf_resnet26_tiny']  # no temporary folder left
    # a checkpoint that does not name its model cannot become a Hub folder
    torch.save(model.state_dict(), tmp_path / 'bare.pth')
    code, out, err = _call(['--checkpoint', str(tmp_path / 'bare.pth'), '--hf-dir', str(tmp_path / 'h')], capsys)
    assert code == 2 and 'give --model' in err[0] and not (tmp_path / 'h').exists()
