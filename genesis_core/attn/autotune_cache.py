"""The autotuner's disk cache: one JSON file per environment, written atomically, never fatal.

The file lives in the user's cache directory (``$GENESIS_CACHE_DIR``, else the platform's cache
dir + ``genesis``) and is named after a hash of the environment it was measured in (GPU names,
torch/CUDA versions, Genesis and kernel package versions), so two environments sharing a cache
dir never read each other's choices. The environment is also stored inside the file; a file whose
content is not valid JSON of the expected shape (corrupt) or whose environment differs (foreign)
is renamed aside (``*.corrupt-<time>`` / ``*.foreign-<time>``) and rebuilt.

Writes re-read the file, merge, and replace it through a temporary file and ``os.replace`` while
holding a lock file, so concurrent writers (threads or processes) neither tear the file nor drop
each other's entries. Every disk error is logged once and the cache carries on in memory.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Dict, Iterator, Optional

from .._log import log_once, logger

FORMAT = 1
ENV_CACHE_DIR = "GENESIS_CACHE_DIR"
_LOCK_TIMEOUT_S = 5.0


def cache_dir() -> Path:
    """``$GENESIS_CACHE_DIR``, else the platform cache dir (XDG, ``~/Library/Caches``, ``%LOCALAPPDATA%``) + ``genesis``."""
    env = os.environ.get(ENV_CACHE_DIR)
    if env:
        return Path(env).expanduser()
    if sys.platform.startswith("win"):
        base = os.environ.get("LOCALAPPDATA") or os.path.join(os.path.expanduser("~"), "AppData", "Local")
        return Path(base) / "genesis" / "Cache"
    if sys.platform == "darwin":
        return Path(os.path.expanduser("~/Library/Caches")) / "genesis"
    base = os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache")
    return Path(base) / "genesis"


def env_key(env: dict) -> str:
    """A short stable hash of an environment description (the file name's suffix)."""
    blob = json.dumps(env, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def cache_path(env: dict) -> Path:
    return cache_dir() / f"autotune-{env_key(env)}.json"


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    """Best-effort inter-process lock on ``path`` + ``.lock`` (flock on POSIX, msvcrt on Windows)."""
    lock_path = str(path) + ".lock"
    try:
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError:
        yield
        return
    locked = False
    try:
        deadline = time.monotonic() + _LOCK_TIMEOUT_S
        while True:
            try:
                if os.name == "nt":
                    import msvcrt

                    msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)
                else:
                    import fcntl

                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                locked = True
                break
            except OSError:
                if time.monotonic() > deadline:
                    break  # a stuck lock must not stop inference: write anyway (the replace is still atomic)
                time.sleep(0.01)
        yield
    finally:
        if locked:
            try:
                if os.name == "nt":
                    import msvcrt

                    os.lseek(fd, 0, os.SEEK_SET)
                    msvcrt.locking(fd, msvcrt.LK_UNLCK, 1)
                else:
                    import fcntl

                    fcntl.flock(fd, fcntl.LOCK_UN)
            except OSError:
                pass
        os.close(fd)


def _set_aside(path: Path, why: str) -> None:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    target = path.with_name(f"{path.name}.{why}-{stamp}-{os.getpid()}")
    try:
        os.replace(path, target)
        logger.warning("autotune cache %s was %s; set aside as %s and rebuilding", path, why, target.name)
    except OSError as exc:
        log_once(("autotune-aside", str(path)), f"autotune cache {path} was {why} and could not be moved aside ({exc})")


class DiskCache:
    """Entries ``{signature: dict}`` for one environment, in one JSON file."""

    def __init__(self, env: dict, path: Optional[Path] = None):
        self.env = env
        self.path = Path(path) if path is not None else cache_path(env)
        self._lock = threading.Lock()

    def _read_unlocked(self) -> Dict[str, dict]:
        """The file's entries; {} when absent. A corrupt or foreign file is set aside."""
        try:
            raw = self.path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return {}
        except OSError as exc:
            log_once(("autotune-read", str(self.path)), f"autotune cache {self.path} unreadable ({exc}); measuring again")
            return {}
        try:
            data = json.loads(raw)
            ok = isinstance(data, dict) and isinstance(data.get("entries"), dict)
            if ok:
                ok = all(isinstance(k, str) and isinstance(v, dict) for k, v in data["entries"].items())
        except ValueError:
            ok = False
        if not ok:
            _set_aside(self.path, "corrupt")
            return {}
        if data.get("format") != FORMAT or data.get("env") != self.env:
            _set_aside(self.path, "foreign")
            return {}
        return data["entries"]

    def load(self) -> Dict[str, dict]:
        """Every stored entry (never raises)."""
        with self._lock:
            try:
                return self._read_unlocked()
            except Exception as exc:  # never fatal
                log_once(("autotune-load", str(self.path)), f"autotune cache {self.path} not loaded ({exc})")
                return {}

    def update(self, entries: Dict[str, dict]) -> bool:
        """Merge ``entries`` into the file (re-read, merge, atomic replace). False when the disk refused."""
        with self._lock:
            try:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                with _file_lock(self.path):
                    merged = self._read_unlocked()
                    merged.update(entries)
                    payload = {"format": FORMAT, "env": self.env, "entries": merged}
                    fd, tmp = tempfile.mkstemp(prefix=self.path.name + ".", suffix=".tmp", dir=str(self.path.parent))
                    try:
                        with os.fdopen(fd, "w", encoding="utf-8") as fh:
                            json.dump(payload, fh, indent=1, sort_keys=True)
                            fh.flush()
                            os.fsync(fh.fileno())
                        os.replace(tmp, self.path)
                    except BaseException:
                        with contextlib.suppress(OSError):
                            os.unlink(tmp)
                        raise
                return True
            except Exception as exc:
                log_once(("autotune-write", str(self.path)),
                         f"autotune cache {self.path} not written ({type(exc).__name__}: {exc}); keeping choices in memory")
                return False

    def remove(self) -> None:
        """Delete the file (``autotune.clear()``); a missing file is fine."""
        with self._lock:
            with contextlib.suppress(FileNotFoundError, OSError):
                os.unlink(self.path)
