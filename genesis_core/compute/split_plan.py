"""How ``split_execute`` divides one batch across workers: cutting and gathering, and the throughput planner.

* :func:`plan_shares`: rows per worker so that all finish together, from cost models ``time = a + b * rows``;
* :class:`SplitPlanner`: the calibration state of one executor - per (fn, per-row shapes, workers) key the
  fits measured each worker alone, refined by real runs, the split sizes already seen, the sticky last
  plan, the losing-split count and the smaller set of workers a key is restricted to - and the planning,
  refining and judging on it;
* :func:`batch_args`, :func:`slice_args`, :func:`gather`, :func:`owns_memory`: a batch cut along ``dim``
  and the results put back together.

The planner runs user code only through the ``timer`` it is given (``timer(worker name, rows) -> seconds``
of that many rows on that worker alone), never while holding its lock: ``fn`` may itself split.
"""
from __future__ import annotations

import threading
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch

from .._log import log_once, logger
from ._tree import iter_tensors, map_tensors
from .placement import callable_key

Timer = Callable[[str, int], float]
Keyed = Tuple[Any, Any]  # (calibration key, what keeps the key's objects alive)


def plan_shares(total: int, models: Sequence[Tuple[float, float]]) -> List[int]:
    """Rows per worker so that all finish together, given per-worker cost models ``time = a + b * rows``.

    Solves ``a_i + b_i * n_i = T`` with ``sum(n_i) = total``; workers whose fixed cost ``a_i`` exceeds the
    common finish time get 0 rows. Rounding keeps the sum exact: each leftover row goes to the worker that
    would finish it soonest (so a slow worker is not handed a row just for a large fractional share).
    """
    if total < 0:
        raise ValueError(f"total must be >= 0; got {total}")
    if not models:
        raise ValueError("models must hold at least one (a, b) cost model; got none")
    active = list(range(len(models)))
    share = [0.0] * len(models)
    while active:
        inv = sum(1.0 / models[i][1] for i in active)
        t_end = (total + sum(models[i][0] / models[i][1] for i in active)) / inv
        share = [0.0] * len(models)
        for i in active:
            share[i] = (t_end - models[i][0]) / models[i][1]
        negative = [i for i in active if share[i] <= 0]
        if not negative:
            break
        active.remove(max(negative, key=lambda i: models[i][0]))
    if not active:  # every fixed cost dominates: give everything to the cheapest single worker
        best = min(range(len(models)), key=lambda i: models[i][0] + models[i][1] * total)
        share = [0.0] * len(models)
        share[best] = float(total)
    counts = [int(s) for s in share]
    for _ in range(total - sum(counts)):  # fewer than len(models) rows: each goes where it ends soonest
        best = min(range(len(models)), key=lambda i: models[i][0] + models[i][1] * (counts[i] + 1))
        counts[best] += 1
    return counts


def calibration_key(fn: Callable[..., Any], args: Tuple[Any, ...], names: Sequence[str], dim: int) -> Keyed:
    """The key a split's fits are kept under: fn's identity, the per-row shapes and dtypes, the workers."""
    fkey, keep = callable_key(fn)
    rows = tuple((tuple(s for j, s in enumerate(t.shape) if j != dim % t.dim()), t.dtype)
                 for t in iter_tensors(args))
    return (fkey, rows, tuple(names)), keep


class SplitPlanner:
    """One executor's throughput fits and the plans made from them; thread-safe.

    The knobs are read from ``knobs`` (the executor, whose class attributes document them) at each use:
    ``SPLIT_MARGIN`` (a split *loses* when slower than the best smaller set's prediction by more than this),
    ``SPLIT_LOSSES`` (consecutive losses before a key drops to that set), ``SPLIT_STICKY`` (a refined plan
    replaces the last one only if a share moves by more than this share of the batch).
    """

    SPLIT_MARGIN = 0.10
    SPLIT_LOSSES = 2
    SPLIT_STICKY = 0.05

    def __init__(self, knobs: Any = None) -> None:
        self._knobs = knobs if knobs is not None else self
        self._calibration: Dict[Any, Dict[str, List[float]]] = {}
        self._calibration_keep: Dict[Any, Any] = {}
        # Guards the calibration dicts only; never held while user code runs (a fn may itself split).
        self._calibration_lock = threading.Lock()
        # Calibration key -> Event set when the thread measuring that key is done (others wait on it),
        # and the measuring thread's id (a nested call with the same key from it must not wait on itself).
        self._calibrating: Dict[Any, Tuple[threading.Event, int]] = {}
        self._calibration_generation = 0  # bumped by clear(): measurements started before are dropped
        # Calibration key -> the fits as measured, each worker alone (the refined ones drift under contention).
        self._solo: Dict[Any, Dict[str, Tuple[float, float]]] = {}
        # Calibration key -> consecutive real splits that lost to a smaller set of its workers (see
        # check_paid_off), and the workers the key is restricted to once they reach SPLIT_LOSSES.
        self._losses: Dict[Any, int] = {}
        self._subset: Dict[Any, Tuple[str, ...]] = {}
        # Calibration key -> (worker, rows) pairs already run: a split size's first run pays first-call costs
        # (a new shape: dispatch plans, cuDNN graphs, ONNX exports) and is neither learnt from nor judged.
        self._sizes_seen: Dict[Any, set] = {}
        # (calibration key, batch size) -> the rows per worker last planned. Refinement moves the fits a little
        # after every run; replanning each time would give new split sizes, i.e. new shapes and their first-call
        # costs, on every other call (seen on two H100s). Kept unless a share moves by more than SPLIT_STICKY.
        self._last_counts: Dict[Any, List[int]] = {}

    def clear(self) -> None:
        """Forget every throughput measurement (the next split calibrates again)."""
        with self._calibration_lock:
            self._calibration.clear()
            self._calibration_keep.clear()
            self._solo.clear()
            self._losses.clear()
            self._sizes_seen.clear()
            self._last_counts.clear()
            self._subset.clear()
            self._calibration_generation += 1

    def solo_fits(self) -> List[Dict[str, Tuple[float, float]]]:
        """The fits ``(a, b)`` in seconds each key measured, worker alone (for reports)."""
        with self._calibration_lock:
            return [dict(fits) for fits in self._solo.values()]

    def plan(self, total: int, names: List[str], keyed: Optional[Keyed], timer: Timer,
             remember: bool = True) -> List[int]:
        """Rows per worker. ``keyed``: :func:`calibration_key` when calibrating (None: split evenly)."""
        if len(names) == 1:
            return [total]
        if keyed is None:
            return plan_shares(total, [(0.0, 1.0)] * len(names))
        key, keep = keyed
        me = threading.get_ident()
        while True:
            with self._calibration_lock:
                models = self._calibration.get(key)
                if models is not None:
                    allowed = self._subset.get(key)
                    if allowed is None:
                        counts = plan_shares(total, [tuple(models[n]) for n in names])
                    else:
                        idx = [i for i, n in enumerate(names) if n in allowed]
                        counts = [0] * len(names)
                        for i, c in zip(idx, plan_shares(total, [tuple(models[names[i]]) for i in idx])):
                            counts[i] = c
                    return self._sticky(key, total, counts, remember)
                busy = self._calibrating.get(key)
                if busy is None:
                    done = threading.Event()
                    self._calibrating[key] = (done, me)
                    generation = self._calibration_generation
                    break
            event, owner = busy
            if owner == me:  # fn splits itself with the same key while being measured: no fit yet
                return plan_shares(total, [(0.0, 1.0)] * len(names))
            event.wait()  # another thread is measuring this key; then read its result (or measure if it failed)
        # Measure outside the lock: user code runs here, and it may call split_execute itself.
        try:
            models = {n: self.fit(timer, n, total) for n in names}
        except BaseException:
            with self._calibration_lock:
                self._calibrating.pop(key, None)
            done.set()  # waiters wake up, find no fit and measure themselves
            raise
        with self._calibration_lock:  # publish the fit and retire the marker together: waiters see one or the other
            if self._calibration_generation == generation:  # clear() meanwhile: do not store
                self._calibration[key] = models
                self._calibration_keep[key] = keep
                self._solo[key] = {name: (a, b) for name, (a, b) in models.items()}
            self._calibrating.pop(key, None)
            models = {name: list(ab) for name, ab in models.items()}  # refinements by others never touch ours
        done.set()
        logger.debug("split calibration %s", {k: (round(a * 1e3, 3), round(b * 1e6, 3))
                                              for k, (a, b) in models.items()})
        return plan_shares(total, [tuple(models[n]) for n in names])

    @staticmethod
    def fit(timer: Timer, name: str, total: int) -> List[float]:
        """Fit ``time = a + b * rows`` on one worker from short runs (sequential: each worker alone)."""
        small = max(1, total // 8)
        large = max(small, total // 2)
        # Warm-ups, one per size: first-call costs (allocations, dispatch plans and autotuning, cuDNN graphs,
        # ONNX exports) come per shape and must not count.
        timer(name, small)
        if large > small:
            timer(name, large)
        t_small = min(timer(name, small), timer(name, small))
        if large > small:
            t_large = min(timer(name, large), timer(name, large))  # one-off stalls (allocator, page faults) of ~50 ms seen on H100s
            b = (t_large - t_small) / (large - small)
            b = max(b, 0.05 * t_large / large, 1e-9)  # noise can make the slope tiny or negative
            a = max(t_small - b * small, 0.0)
        else:
            b, a = max(t_small / small, 1e-9), 0.0
        return [a, b]

    def _sticky(self, key: Any, total: int, counts: List[int], remember: bool = True) -> List[int]:
        """``counts``, or the rows last planned for this key and batch size when no share moved by more than
        ``SPLIT_STICKY`` of the batch (and the same workers take part); ``remember=False`` (``split_plan``)
        answers without recording. Called with the calibration lock held."""
        prev = self._last_counts.get((key, total))
        if prev is not None and len(prev) == len(counts) and all((p == 0) == (c == 0) for p, c in zip(prev, counts)):
            if max(abs(p - c) for p, c in zip(prev, counts)) <= max(1, int(self._knobs.SPLIT_STICKY * total)):
                return list(prev)
        if len(self._last_counts) >= 4096:
            self._last_counts.clear()
        self._last_counts[(key, total)] = list(counts)
        return counts

    def sizes_known(self, key: Any, used: List[Tuple[str, int]]) -> bool:
        """Whether every worker of this run had run its row count before (for this key); records them."""
        pairs = set(used)
        with self._calibration_lock:
            if key not in self._calibration:
                return False
            seen = self._sizes_seen.setdefault(key, set())
            known = pairs <= seen
            if len(seen) > 4096:  # a key whose sizes never settle: keep the memory bounded
                seen.clear()
            seen |= pairs
        return known

    def check_paid_off(self, key: Any, ran: List[str], total: int, wall: float) -> None:
        """After a real split over the workers ``ran``: did it beat the sets made of its fastest workers?

        The references are predictions from each worker's fit as measured alone (not the refined one, which
        absorbs contention): for the fastest worker alone, the fastest two split, and so on (workers ranked
        by their solo time for the whole batch; a set's prediction is the finish time :func:`plan_shares`
        gives it; only these nested sets are tried, not every subset, so a fast worker that slows the others
        is not the one dropped first). The fits are made one worker at a time, so they miss contention (a CPU
        kernel starving the thread that feeds a GPU) - but the split's wall time also holds costs a solo fit
        does not (the hand-off to the worker threads, result copies, the concatenation) and one run can be
        slow for unrelated reasons. So a split *loses* only when its wall time exceeds the best smaller set's
        prediction by more than ``SPLIT_MARGIN``, and only ``SPLIT_LOSSES`` consecutive losses restrict the key
        to that set (a win resets the count): with CPU,
        cuda:0 and cuda:1, a CPU that slows the GPUs drops out and the two GPUs keep splitting; a set that
        keeps losing shrinks again, down to one worker. The restriction lasts until :meth:`clear`; logged once.
        """
        with self._calibration_lock:
            solo_fits = self._solo.get(key)
            if solo_fits is None or len(ran) < 2 or any(n not in solo_fits for n in ran):
                return
            ranked = sorted(ran, key=lambda n: solo_fits[n][0] + solo_fits[n][1] * total)
            predicted = {}
            for m in range(1, len(ranked)):
                fits = [tuple(solo_fits[n]) for n in ranked[:m]]
                predicted[tuple(ranked[:m])] = max(a + b * c for (a, b), c in zip(fits, plan_shares(total, fits))
                                                   if c > 0)
            best = min(predicted, key=predicted.get)
            if wall <= predicted[best] * (1.0 + self._knobs.SPLIT_MARGIN):
                self._losses.pop(key, None)
                return
            losses = self._losses.get(key, 0) + 1
            self._losses[key] = losses
            names = ", ".join(f"'{n}'" for n in ran if n in best)  # in the caller's order
            if losses < self._knobs.SPLIT_LOSSES:
                logger.debug("split over %s took %.2f ms, more than %s is predicted to take (%.2f ms); loss %d of %d",
                             ", ".join(ran), wall * 1e3, names, predicted[best] * 1e3, losses,
                             self._knobs.SPLIT_LOSSES)
                return
            self._subset[key] = best
            self._losses.pop(key, None)
            log_once(("split-subset", key[0], key[2], best),
                     f"split over {', '.join(ran)} took {wall * 1e3:.2f} ms, more than {names} "
                     f"{'alone ' if len(best) == 1 else ''}is predicted to take ({predicted[best] * 1e3:.2f} ms), "
                     f"{losses} runs in a row: later calls like this run on {names} only "
                     f"(clear_calibration() measures again)")

    def refine(self, key: Any, observed: List[Tuple[str, int, float]]) -> None:
        """Move each worker's slope halfway towards what a real run of ``(name, rows, seconds)`` showed."""
        with self._calibration_lock:
            models = self._calibration.get(key)
            if models is None:
                return
            for name, rows, seconds in observed:
                a, b = models[name]
                b_seen = max(seconds - a, 1e-9) / rows
                models[name] = [a, 0.5 * b + 0.5 * b_seen]


# ---------------------------------------------------------------- cutting a batch and putting it back


def batch_args(batch: Any, dim: int) -> Tuple[Tuple[Any, ...], int]:
    """``batch`` as positional arguments and its size along ``dim`` (every tensor in it must agree)."""
    args = batch if isinstance(batch, tuple) else (batch,)
    sizes = []
    for t in iter_tensors(args):
        if t.dim() == 0 or not -t.dim() <= dim < t.dim():
            raise ValueError(f"every tensor in batch must have dimension {dim} to split on; got shape "
                             f"{tuple(t.shape)}")
        sizes.append(t.shape[dim])
    if not sizes:
        raise ValueError("batch must contain at least one tensor to split; got none")
    if len(set(sizes)) != 1:
        raise ValueError(f"every tensor in batch must have the same size along dim {dim}; got sizes {sizes}")
    if sizes[0] == 0:
        raise ValueError(f"batch is empty along dim {dim}; nothing to split")
    return args, sizes[0]


def slice_args(args: Tuple[Any, ...], dim: int, start: int, length: int) -> Tuple[Any, ...]:
    """Rows ``start`` to ``start + length`` of every tensor in ``args`` (views, no copies)."""
    return map_tensors(args, lambda t: t.narrow(dim, start, length))


def owns_memory(result: Any, args: Tuple[Any, ...]) -> bool:
    """Whether ``result`` is one contiguous tensor sharing no memory with the batch (so it can be returned as
    it is: what a concatenation would give, without the copy)."""
    if not isinstance(result, torch.Tensor) or not result.is_contiguous():
        return False
    try:
        ptr = result.untyped_storage().data_ptr()
        return all(t.untyped_storage().data_ptr() != ptr for t in iter_tensors(args))
    except Exception:  # noqa: BLE001 - no plain storage (sparse, nested, subclasses): copy as before
        return False


def gather(results: List[Any], dim: int) -> Any:
    """The splits' results concatenated along ``dim``: tensors, or lists/tuples/named tuples/dicts of them."""
    first = results[0]
    if isinstance(first, torch.Tensor):
        return torch.cat(results, dim=dim)
    if isinstance(first, (list, tuple)):
        if any(not isinstance(r, (list, tuple)) or len(r) != len(first) for r in results):
            raise ValueError("split results must have the same structure to be gathered")
        items = [gather([r[i] for r in results], dim) for i in range(len(first))]
        return items if isinstance(first, list) else (type(first)(*items) if hasattr(first, "_fields")
                                                      else tuple(items))
    if isinstance(first, dict):
        return {k: gather([r[k] for r in results], dim) for k in first}
    if any(r != first for r in results):
        raise ValueError(f"split results hold non-tensor values that differ between splits: "
                         f"{[r for r in results][:4]}; cannot gather them")
    return first
