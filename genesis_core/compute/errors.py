"""The executor's errors: a backend missing here, a name the executor cannot serve, failed parallel splits."""
from __future__ import annotations

from typing import Any, List, Sequence, Tuple

from .backends import ComputeBackend


class BackendUnavailableError(RuntimeError):
    """A backend was asked for that detection found missing. Carries ``backend``, ``reason``, ``available``."""

    def __init__(self, backend: ComputeBackend, reason: str, available: Sequence[ComputeBackend]) -> None:
        self.backend, self.reason, self.available = backend, reason, list(available)
        names = ", ".join(b.value for b in self.available) or "none"
        super().__init__(f"ComputeBackend.{backend.name} is not available here: {reason}. "
                         f"Available backends: {names}.")


class BackendNotRegisteredError(KeyError, ValueError):
    """A backend or worker name this executor cannot serve: neither registered nor a detected torch backend.

    The message lists the registered workers and the backends usable without registering. A ``KeyError``
    (what earlier versions raised, so ``except KeyError`` still works) and a ``ValueError`` (a bad argument),
    whose text reads as a sentence rather than a quoted key.
    """

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


class ParallelExecutionError(RuntimeError):
    """One or more splits of a parallel run failed; raised after every split finished.

    ``failures`` lists ``(split index, worker name, exception)``; ``results`` holds the successful results
    in split order (``None`` where a split failed).
    """

    def __init__(self, failures: List[Tuple[int, str, BaseException]], results: List[Any], total: int) -> None:
        self.failures, self.results = failures, results
        parts = [f"split {i} on backend {name!r}: {type(e).__name__}: {e}" for i, name, e in failures]
        super().__init__(f"{len(failures)} of {total} splits failed - " + "; ".join(parts))
