"""Utilities shared by scripts and tests."""
from .flops import count_macs

__all__ = ['count_macs']
