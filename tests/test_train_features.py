"""train.py's optional features each run (one short epoch, in this process), the epoch hooks see every
epoch including after a resume, and fine-tuning from --pretrained-file drops a mismatched classifier."""

import pytest
import torch

from ddfnet.cli import run_main
from ddfnet.training import hooks

from support import tiny_run
from support.runner import load_script

pytestmark = pytest.mark.usefixtures('one_thread')


def train(argv):
    module = load_script('train')
    run_main(lambda: module.main(argv), 'train.py')


def tiny_args(data_dir, output, *extra):
    return tiny_run.tiny_args(data_dir, output, *extra, per_class=4, epochs=1, warmup=0)


def load(path):
    return torch.load(path, map_location='cpu', weights_only=True)


@pytest.mark.parametrize('features', [
    ['--mixup', '0.2', '--cutmix', '1.0', '--model-ema', '--model-ema-decay', '0.5', '--grad-accum-steps', '2',
     '--clip-grad', '1.0', '--opt', 'lamb', '--sched', 'step', '--drop-path', '0.1'],
    ['--amp', '--amp-dtype', 'bfloat16', '--channels-last', '--opt', 'adamw', '--aa', 'rand-m7-mstd0.5-inc1',
     '--reprob', '0.4', '--recount', '3', '--train-interpolation', 'random', '--sched-on-updates'],
    ['--amp', '--amp-dtype', 'float16', '--opt', 'momentum', '--clip-grad', '5.0'],  # with a gradient scaler
], ids=['mixup-ema-accum-clip-lamb', 'bf16-channels-last-randaugment', 'fp16-scaler'])
def test_features_run(data_dir, tmp_path, features):
    train(tiny_args(data_dir, tmp_path, *features))
    saved = load(tmp_path / 'run' / 'last.pth.tar')
    assert saved['state']['epoch'] == 1 and saved['state']['num_updates'] >= 1
    assert all(torch.isfinite(v).all() for v in saved['model'].values() if v.is_floating_point())
    if '--model-ema' in features:
        assert saved['model_ema'] is not None
        assert not torch.equal(saved['model_ema']['conv1.weight'], saved['model']['conv1.weight'])
    if '--amp-dtype' in features and 'float16' in features:
        assert saved['scaler'] and saved['scaler']['scale'] > 0


def test_epoch_hooks_see_every_epoch_also_after_resume(data_dir, tmp_path):
    seen = []

    def record(model, epoch, args):
        seen.append((epoch, args.dyconv_temp_start))

    hooks.register_epoch_hook(record)
    try:
        train(tiny_args(data_dir, tmp_path, '--epochs', '2', '--dyconv-temp-start', '20'))
        train(tiny_args(data_dir, tmp_path, '--epochs', '3', '--dyconv-temp-start', '20', '--resume', 'auto'))
    finally:
        hooks._HOOKS.remove(record)
    assert seen == [(0, 20.0), (1, 20.0), (2, 20.0)]
    assert (tmp_path / 'run' / 'args-resume-e2-s0.yaml').exists()  # the first launch's args.yaml is kept


def test_pretrained_file_fine_tunes_with_a_new_classifier(data_dir, tmp_path):
    train(tiny_args(data_dir, tmp_path / 'a', '--checkpoint-interval', '1', '--checkpoint-hist', '1', '--epochs', '2'))
    source = tmp_path / 'a' / 'run'
    # named after the epoch it ends, numbered from 0 like the log and summary.csv; older ones pruned
    assert sorted(p.name for p in source.glob('checkpoint-*')) == ['checkpoint-1.pth.tar']
    assert load(source / 'checkpoint-1.pth.tar')['state']['epoch'] == 2
    assert 'epoch 1: train loss' in (source / 'log.txt').read_text()
    # lr 0 and no weight decay: the loaded weights must come through the epoch unchanged
    train(tiny_args(data_dir, tmp_path / 'b', '--pretrained-file', str(source / 'last.pth.tar'), '--num-classes', '10',
                    '--lr', '0', '--min-lr', '0', '--weight-decay', '0', '--opt', 'sgd'))
    before, after = load(source / 'last.pth.tar')['model'], load(tmp_path / 'b' / 'run' / 'last.pth.tar')['model']
    total = len(after)
    assert (f'--pretrained-file {source / "last.pth.tar"}: loaded {total - 2} of {total} tensors; dropped the '
            'classifier (fc.weight, fc.bias: kept at its initial values, 10 classes here)'
            in (tmp_path / 'b' / 'run' / 'log.txt').read_text())
    assert after['fc.weight'].shape == (10, before['fc.weight'].shape[1])
    assert torch.equal(after['conv1.weight'], before['conv1.weight'])
    ddf_weight = 'layer4.0.conv2.spatial_branch.0.weight'
    assert torch.equal(after[ddf_weight], before[ddf_weight])


def test_evaluate_scores_the_ema_model_in_the_same_pass():
    from ddfnet.training.engine import evaluate
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 7))
    ema = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 7))
    batches = [(torch.randn(5, 3, 2, 2), torch.randint(0, 7, (5,))) for _ in range(3)]

    class Loader:
        passes = 0

        def __iter__(self):
            Loader.passes += 1
            return iter(batches)

    both = evaluate(model, Loader(), torch.device('cpu'), ema_model=ema)
    assert Loader.passes == 1
    alone = evaluate(ema, batches, torch.device('cpu'))
    assert both == {**evaluate(model, batches, torch.device('cpu')), **{f'ema_{k}': v for k, v in alone.items()}}
    assert 0 <= both['top1'] <= both['top5'] <= 100


def test_evaluate_counts_each_image_once_under_a_padded_distributed_sampler():
    from timm.data.distributed_sampler import OrderedDistributedSampler

    from ddfnet.training.engine import evaluate
    images, targets = torch.randn(10, 3, 2, 2), torch.arange(10) % 7
    dataset = torch.utils.data.TensorDataset(images, targets)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 7))
    # 10 images on 3 ranks: rank 2 gets images 2, 5, 8 and a repeat of image 0 as padding.
    sampler = OrderedDistributedSampler(dataset, num_replicas=3, rank=2)
    loader = torch.utils.data.DataLoader(dataset, batch_size=3, sampler=sampler)
    got = evaluate(model, loader, torch.device('cpu'))
    want = evaluate(model, [(images[[2, 5, 8]], targets[[2, 5, 8]])], torch.device('cpu'))
    assert len(list(sampler)) == 4 and got == want
