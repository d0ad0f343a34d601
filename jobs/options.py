"""Job options: one typed dataclass per job, from which its flags, its spec schema and job.yaml come.

(Being built: see issue 12.) Flag value types shared by commands live here.
"""

from __future__ import annotations

import argparse
import json
from typing import Any

EXECUTORS = ("ray", "local")


def json_object(text: str) -> dict[str, Any]:
    """``--storage-options``: a JSON object, inline or ``@file.json``."""
    if text.startswith("@"):
        with open(text[1:], encoding="utf-8") as f:
            text = f.read()
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise argparse.ArgumentTypeError(f"not valid JSON ({exc}): {text!r}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"must be a JSON object, got {type(value).__name__}: {text!r}")
    return value
