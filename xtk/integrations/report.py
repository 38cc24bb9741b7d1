"""``PatchReport``: what an in-place patch (``xtk.patch`` for x-transformers objects,
``xtk.integrations.hf.patch`` for Hugging Face models) swapped for xtk's ops, and what it left on
the original path and why. One type for every integration, so that a user reads one format."""
from __future__ import annotations

import logging
from dataclasses import dataclass, field

__all__ = ["PatchReport"]

_log = logging.getLogger("xtk.patch")
_ATTR = "_xtk_patch_report"   # on the model a patch was given: its report (python -m xtk info --model)


@dataclass
class PatchReport:
    """``swapped``: ``(module path, what now runs)`` per patched module, e.g. ``("layers.0.1",
    "attention: xtk.attention, ALiBi in-kernel")``; ``kept``: ``(module path, why it stays on its
    original path)`` per module the patch recognised but could not run in xtk (a feature the
    kernels do not have). ``model``: the patched model's class name."""

    model: str
    swapped: list = field(default_factory=list)
    kept: list = field(default_factory=list)

    def swap(self, path: str, what: str) -> None:
        """Record that the module at ``path`` now runs ``what``."""
        self.swapped.append((path, what))

    def keep(self, path: str, why: str) -> None:
        """Record that the module at ``path`` stays as it was, and why."""
        self.kept.append((path, why))

    def log(self) -> "PatchReport":
        """Log the report (logger ``xtk.patch``: a summary at INFO, every kept module at WARNING,
        since a kept module runs slower than the user may expect); returns ``self``."""
        _log.info("xtk.patch(%s): %d modules swapped, %d kept", self.model, len(self.swapped), len(self.kept))
        for path, why in self.kept:
            _log.warning("xtk.patch(%s): %s kept on its original path: %s", self.model, path or "<root>", why)
        return self

    def __str__(self) -> str:
        lines = [f"xtk patch of {self.model}: {len(self.swapped)} swapped, {len(self.kept)} kept"]
        lines += [f"  swapped {path or '<root>'}: {what}" for path, what in self.swapped]
        lines += [f"  kept    {path or '<root>'}: {why}" for path, why in self.kept]
        return "\n".join(lines)

    def attach(self, model) -> "PatchReport":
        """Keep this report on ``model`` (the patched root), where ``PatchReport.of`` finds it."""
        model.__dict__[_ATTR] = self
        return self

    @staticmethod
    def of(model) -> "PatchReport | None":
        """The report of the patch applied to ``model``, or None when it is not patched."""
        return model.__dict__.get(_ATTR)

    @staticmethod
    def detach(model) -> None:
        """Forget the report (unpatch)."""
        model.__dict__.pop(_ATTR, None)
