"""The eager oracle: plain PyTorch, written to be read, against which every kernel is tested.

Modules: ``attention`` (SPEC §2), ``rms_norm`` and ``glu`` (SPEC §3)."""
