"""For the notebooks: set-up and reference mode (``helpers``), figures, the interactive
explorer (``widgets``) and the headless runner (``runner``)."""

from __future__ import annotations

from .helpers import (
    headless,
    pick_test_samples,
    reference_mode,
    setup,
    weights_banner,
    work_dir,
)

__all__ = ["headless", "pick_test_samples", "reference_mode", "setup", "weights_banner", "work_dir"]
