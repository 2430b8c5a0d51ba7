"""What the tests share, and are not tests themselves (pytest puts ``tests/`` on the import path:
``from support.runner import ...``; subprocesses get it from ``runner.repo_env``):

  runner          the repository's scripts, loaded as modules or run as subprocesses; ``repo_env``
  tiny_run        the arguments of a tiny train.py run
  oracles         the naive DDF op and the op tests' inputs
  backends        the kernels the op tests run on (cpu, cuda, emu) and their check against the reference
  gradient_penalty  gradients of an input-gradient penalty, compared across processes
  cuda_emulation  the CUDA kernels compiled for the CPU (its C++ under ``csrc/``)
  emu_sanitized, elastic_train  programs the tests run in subprocesses
"""
