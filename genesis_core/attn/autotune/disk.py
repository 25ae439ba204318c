"""The autotuner's disk cache: one JSON file per environment, bounded, validated, written atomically, never fatal.

The file lives in the user's cache directory (``$GENESIS_CACHE_DIR``, else the platform's cache
dir + ``genesis``) and is named after a hash of the environment it was measured in (GPU names,
torch/CUDA versions, Genesis and kernel package versions), so two environments sharing a cache
dir never read each other's choices. The environment is also stored inside the file; a file whose
content is not valid JSON of the expected shape (corrupt) or whose environment differs (foreign)
is renamed aside (``*.corrupt-<time>`` / ``*.foreign-<time>``) and rebuilt.

Every entry is checked against a schema on read (:func:`valid_entry`): an entry with fields of the wrong
type, or naming a backend that does not exist, is dropped and logged once; a file that is not UTF-8 JSON,
or larger than ``MAX_FILE_BYTES``, is set aside unread. The file keeps at most ``MAX_ENTRIES`` entries; the
oldest (by measurement time) are evicted.

Writes re-read the file, merge, and replace it through a temporary file and ``os.replace`` while
holding a lock file, so concurrent writers (threads or processes) neither tear the file nor drop
each other's entries. A writer that cannot get the lock within ``LOCK_TIMEOUT_S`` does not write (its
choices stay in memory for this process; said once). Every disk error is logged once and the cache
carries on in memory.
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
import math
from typing import Callable, Dict, Iterable, Iterator, Optional

from ..._log import log_once, logger

FORMAT = 1
ENV_CACHE_DIR = "GENESIS_CACHE_DIR"
LOCK_TIMEOUT_S = 5.0
MAX_ENTRIES = 2000  # per environment file; a model uses a few dozen signatures
MAX_FILE_BYTES = 8 << 20  # ~2000 entries take ~2 MB; anything much larger is not ours to parse


class LockTimeout(OSError):
    """The cache file's lock was not free within LOCK_TIMEOUT_S."""


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
def _file_lock(path: Path, timeout_s: Optional[float] = None) -> Iterator[None]:
    """Inter-process lock on ``path`` + ``.lock`` (flock on POSIX, msvcrt on Windows); LockTimeout when it
    is not free within ``timeout_s`` (default LOCK_TIMEOUT_S). Nothing is written without it."""
    lock_path = str(path) + ".lock"
    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
    locked = False
    try:
        deadline = time.monotonic() + (LOCK_TIMEOUT_S if timeout_s is None else timeout_s)
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
                    raise LockTimeout(f"lock {lock_path} held by another process for over "
                                      f"{LOCK_TIMEOUT_S if timeout_s is None else timeout_s:g} s")
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


def _bounded(entries: Dict[str, dict], limit: Optional[int] = None) -> Dict[str, dict]:
    """At most ``limit`` (MAX_ENTRIES) entries: the newest by their ``when`` stamp."""
    limit = MAX_ENTRIES if limit is None else limit
    if len(entries) <= limit:
        return entries
    newest = sorted(entries, key=lambda s: str(entries[s].get("when", "")), reverse=True)[:limit]
    return {s: entries[s] for s in newest}


def _set_aside(path: Path, why: str, tag: Optional[str] = None) -> None:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    target = path.with_name(f"{path.name}.{tag or why}-{stamp}-{os.getpid()}")
    try:
        os.replace(path, target)
        logger.warning("autotune cache %s was %s; set aside as %s and rebuilding", path, why, target.name)
    except OSError as exc:
        log_once(("autotune-aside", str(path)), f"autotune cache {path} was {why} and could not be moved aside ({exc})")


_STR_MAPS = ("rejected", "notes")
_NUM_MAPS = ("ms", "rel_err", "cos")


def _finite(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def entry_problem(entry, known: Optional[Iterable[str]] = None) -> Optional[str]:
    """Why ``entry`` is not a well-formed measurement (or names an unknown backend), or None."""
    if not isinstance(entry, dict):
        return f"entry is a {type(entry).__name__}, not an object"
    ms = entry.get("ms")
    if not isinstance(ms, dict) or not all(isinstance(n, str) and _finite(t) and t >= 0 for n, t in ms.items()):
        return "'ms' must map backend names to finite non-negative milliseconds"
    for key in _STR_MAPS:
        value = entry.get(key, {})
        if not isinstance(value, dict) or not all(isinstance(n, str) and isinstance(r, str) for n, r in value.items()):
            return f"'{key}' must map backend names to strings"
    for key in _NUM_MAPS[1:]:
        value = entry.get(key, {})
        if not isinstance(value, dict) or not all(isinstance(n, str) and (e is None or _finite(e))
                                                  for n, e in value.items()):
            return f"'{key}' must map backend names to numbers or null"
    chosen = entry.get("chosen")
    if chosen is not None and not isinstance(chosen, str):
        return "'chosen' must be a backend name or null"
    ranking = entry.get("ranking", [])
    if not isinstance(ranking, list) or not all(isinstance(n, str) for n in ranking):
        return "'ranking' must be a list of backend names"
    for key in ("shape", "when"):
        if key in entry and not isinstance(entry[key], str):
            return f"'{key}' must be a string"
    if known is not None:
        known = set(known)
        named = set(ms) | set(entry.get("rejected", {})) | ({chosen} if chosen else set())
        unknown = sorted(named - known)
        if unknown:
            return f"names backends that do not exist here: {', '.join(unknown)}"
    return None


class DiskCache:
    """Entries ``{signature: dict}`` for one environment, in one JSON file.

    ``known`` (optional) returns the backend names that exist: an entry naming any other is dropped on read.
    """

    def __init__(self, env: dict, path: Optional[Path] = None, known: Optional[Callable[[], Iterable[str]]] = None):
        self.env = env
        self.path = Path(path) if path is not None else cache_path(env)
        self.known = known
        self._lock = threading.Lock()

    def _read_unlocked(self) -> Dict[str, dict]:
        """The file's valid entries; {} when absent. A corrupt, oversized or foreign file is set aside."""
        try:
            size = self.path.stat().st_size
            if size > MAX_FILE_BYTES:
                _set_aside(self.path, f"oversized ({size / 2**20:.0f} MB > {MAX_FILE_BYTES >> 20} MB)",
                           tag="oversized")
                return {}
            raw = self.path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return {}
        except UnicodeDecodeError:
            _set_aside(self.path, "not UTF-8 text", tag="corrupt")
            return {}
        except OSError as exc:
            log_once(("autotune-read", str(self.path)), f"autotune cache {self.path} unreadable ({exc}); measuring again")
            return {}
        try:
            data = json.loads(raw)
            ok = isinstance(data, dict) and isinstance(data.get("entries"), dict)
        except ValueError:
            ok = False
        if not ok:
            _set_aside(self.path, "corrupt")
            return {}
        if data.get("format") != FORMAT or data.get("env") != self.env:
            _set_aside(self.path, "foreign")
            return {}
        known = list(self.known()) if self.known is not None else None
        good: Dict[str, dict] = {}
        for sig, entry in data["entries"].items():
            problem = "signature is not a string" if not isinstance(sig, str) else entry_problem(entry, known)
            if problem:
                log_once(("autotune-bad-entry", str(self.path), str(sig), problem),
                         f"autotune cache {self.path}: entry {str(sig)[:120]!r} dropped: {problem}")
                continue
            good[sig] = entry
        return _bounded(good)

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
                    merged = _bounded(merged)
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
            except LockTimeout as exc:
                log_once(("autotune-lock", str(self.path)),
                         f"autotune cache {self.path} not written: {exc}; this process keeps its choices in memory")
                return False
            except Exception as exc:
                log_once(("autotune-write", str(self.path)),
                         f"autotune cache {self.path} not written ({type(exc).__name__}: {exc}); keeping choices in memory")
                return False

    def remove(self) -> None:
        """Delete the file (``autotune.clear()``); a missing file is fine."""
        with self._lock:
            with contextlib.suppress(FileNotFoundError, OSError):
                os.unlink(self.path)
