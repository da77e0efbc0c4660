"""One logging setup for both commands: timestamped, one line per event."""
from __future__ import annotations

import logging
import os
import sys


def setup(level: str | None = None, name: str = "") -> None:
    level = (level or os.environ.get("FEDTUNE_LOG", "INFO")).upper()
    prefix = f"{name} " if name else ""
    logging.basicConfig(level=getattr(logging, level, logging.INFO), stream=sys.stderr,
                        format=f"%(asctime)s {prefix}%(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    # transformers and absl are chatty at INFO.
    for noisy in ("transformers", "absl", "urllib3"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
