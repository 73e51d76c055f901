"""The CLI's files in the user's config dir (sign-in tokens, pinned node certificates).

Theory of operation: ``$XDG_CONFIG_HOME/galaxy`` (default ``~/.config/galaxy``), created
0700; each file is one JSON document read with a size bound (a damaged or foreign file
reads as empty) and replaced atomically with mode 0600, so a crash never leaves half a file
and no other user can read a token or swap a pin.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any


def config_path(name: str, env: Any = None) -> Path:
    env = os.environ if env is None else env
    base = env.get("XDG_CONFIG_HOME") or os.path.join(env.get("HOME") or os.path.expanduser("~"), ".config")
    return Path(base) / "galaxy" / name


def read_table(path: Path, key: str, bytes_max: int) -> dict[str, dict]:
    """``doc[key]``'s entries that are objects; {} when the file is missing or not ours."""
    try:
        with open(path, "rb") as f:
            table = json.loads(f.read(bytes_max))[key]
    except (OSError, ValueError, KeyError, TypeError):
        return {}
    if not isinstance(table, dict):
        return {}
    return {k: v for k, v in table.items() if isinstance(v, dict)}


def write_private(path: Path, doc: Any) -> Path:
    """Replace ``path`` with ``doc`` as JSON, mode 0600, atomically and durably."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}-", dir=path.parent)     # mkstemp: mode 0600
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(doc, f, indent=2)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o600)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise
    return path
