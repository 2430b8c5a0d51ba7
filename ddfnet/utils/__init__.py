"""Utilities shared by the library, the scripts and the tests: FLOP counting (``flops``), atomic writes and
results files (``io``), reading weights files (``weights``), benchmark helpers (``bench``)."""
from .flops import count_macs

__all__ = ['count_macs']
