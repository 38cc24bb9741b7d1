"""Triton kernels, installed as ``xtk.kernels``: one kernel family per op, launchers and custom ops beside them."""
