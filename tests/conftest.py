"""Fixtures shared by the training tests, and the test tiers.

The tiers: ``make test`` runs ``pytest -m "not slow"`` (the fast tier, before every commit: a few minutes on
2 cores, no network), ``make test-all`` everything. A test is slow when SLOW below names its file or its
function (``file::function``, every parametrisation), or when it carries ``@pytest.mark.slow`` itself; a
new test file is fast unless it says otherwise. Measured with ``pytest --durations=0`` on the 2-core machine.
"""
import warnings

import pytest
import torch

SLOW = {
    # file -> why; file::function -> why
    'test_timm_contract.py::test_timm_model_tests_pass_for_every_ddfnet_model':
        "timm's own model tests, fetched from timm's sdist on the package index (network), ~4 min",
    'test_elastic.py': 'torchrun runs: kills, restarts, two agents, the Slurm script on simulated nodes',
    'test_train.py': 'train.py subprocesses, kills and resumes, two ranks under torchrun',
    'test_onnx.py': 'ONNX exports of every model family and the op grid, onnxruntime parity',
    'test_export.py': 'torch.export, FX, TorchScript and torch.compile of every model family',
    'test_after_training.py': 'a 3-epoch training run, then the after-training scripts on it',
    'test_shards.py': 'writes WebDataset shards and trains from them',
    'test_gpu_check.py::test_dry_run_runs_every_part': 'scripts/gpu_check.sh --dry-run: every part, ~2 min',
    'test_gpu_check.py::test_dry_run_results': 'reads the dry run above',
    'test_models.py::test_torch_compile_fullgraph_resnet_inductor': 'inductor compile',
    'test_models.py::test_torch_compile_fullgraph_under_autocast': 'inductor compile',
    'test_dynamic_conv.py::test_torch_compile_fullgraph_training_step': 'inductor compile',
    'test_layers.py::test_ddfpack_exports_and_compiles_with_dynamic_shapes': 'torch.export and compile',
    # Each of these starts Python with torch and timm in a subprocess, or runs whole models: 10-30 s apiece.
    'test_benchmark_scripts.py': 'the benchmark scripts as subprocesses',
    'test_flops.py': 'scripts/count_flops.py as a subprocess per case',
    'test_loader.py::test_benchmark_loader_measures_and_suggests_workers': 'a subprocess',
    'test_configs.py::test_bad_config_is_one_line_from_the_script': 'a subprocess',
    'test_cpu_kernel.py::test_forced_reference_path_in_a_subprocess': 'a subprocess',
    'test_double_backward.py::test_gradient_penalty_native_equals_reference': 'a subprocess',
    'test_op.py::test_reference_memory_stays_near_output_size': 'a subprocess',
    'test_dynamic_conv.py::test_models_convert_to_channels_last': 'whole DyConv models, 20-30 s each',
    'test_ablation_models.py::test_forward_backward_small': 'forward+backward of each ablation model, 8-20 s each',
}


@pytest.hookimpl(tryfirst=True)  # before -m deselects by marker
def pytest_collection_modifyitems(config, items):
    modules = {}
    for item in items:
        file = item.path.name
        modules[file] = getattr(item, 'module', None)
        for key in (file, f'{file}::{getattr(item, "originalname", item.name)}'):
            if key in SLOW:
                item.add_marker(pytest.mark.slow)
        # The CUDA kernels under emulation: a separate extension built on first use (minutes), then about
        # 0.15 s of CPU per case; make test-all builds it first (make emulation).
        if file == 'test_cuda_emulation.py' or getattr(item, 'callspec', None) and item.callspec.params.get('backend') == 'emu':
            item.add_marker(pytest.mark.slow)
    # A function SLOW names that its (collected) file does not define was renamed or removed: say so, or the
    # test under its new name would silently join the fast tier.
    for key in SLOW:
        file, _, function = key.partition('::')
        if function and modules.get(file) is not None and not hasattr(modules[file], function):
            warnings.warn(f'tests/conftest.py: SLOW names {key!r}, which {file} does not define', stacklevel=1)


@pytest.fixture
def one_thread():
    """Runs inside the test process use one intra-op thread, like the subprocesses the tests start: on a
    busy 2-core machine two threads spin at barriers, and bitwise comparisons need equal thread counts."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope='module')
def data_dir(tmp_path_factory):
    """A demo-dataset cache folder per test module (generated on first use)."""
    return str(tmp_path_factory.mktemp('demo-cache'))


@pytest.fixture(autouse=True)
def _restore_root_logging():
    """train.py run in the test process points the root logger at that test's captured stdout; a later test
    would then log into a closed stream ("--- Logging error ---" on its stderr). Put the root logger back."""
    import logging
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    for handler in root.handlers:
        if handler not in handlers:
            handler.close()
    root.handlers[:], root.level = handlers, level
