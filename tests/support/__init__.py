"""What the tests share, and are not tests themselves (pytest puts ``tests/`` on the import path; subprocesses
get it from ``repo_env`` of ``tests/scripts.py``):

  cuda_emulation  the CUDA kernels compiled for the CPU (its C++ under ``csrc/``)
"""
