"""The C accelerator of the per-record loops (``logd/_hot.c``), when there is one.

``ext`` is the compiled module, or None when it was not built (no compiler
at install time) or ``LOGD_NO_EXTENSIONS=1`` asks for pure Python. Callers
keep a pure-Python twin of each function; it is the reference the C code is
tested against (tests/test_hot.py) and what runs when ``ext`` is None.
"""

from __future__ import annotations

import importlib
import os
from types import ModuleType

ext: ModuleType | None = None
if os.environ.get("LOGD_NO_EXTENSIONS", "") in ("", "0"):
    try:
        ext = importlib.import_module("logd._hot")
    except ImportError:  # not built: the pure-Python twins do the work
        ext = None
