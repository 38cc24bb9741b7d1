"""Spy on Triton kernel launches: ``spy_launches(monkeypatch, module, names, record)`` replaces each
named kernel of ``module`` by a wrapper that calls ``record(name, args, kwargs)`` before launching it.
Used by tests/test_attention_hazards.py (the device guard around every launch) and
tests/test_attention_varlen_kernel.py (one launch per kernel for a packed batch)."""


class _Spy:
    def __init__(self, name, kernel, record):
        self.name, self.kernel, self.record = name, kernel, record

    def __getitem__(self, grid):
        launch = self.kernel[grid]

        def run(*args, **kwargs):
            self.record(self.name, args, kwargs)
            return launch(*args, **kwargs)
        return run


def spy_launches(monkeypatch, module, names, record) -> None:
    for name in names:
        monkeypatch.setattr(module, name, _Spy(name, getattr(module, name), record))
