"""A study's fits as Dask tasks: one task per :class:`probes.engine.skeleton.FitJob`, results as a local run's.

``scheduler`` (``probes scale ... --scheduler``): ``tcp://head:8786`` (a running
``dask scheduler``; its workers need this package and, for out-of-core rows, the store at the same
URL) or ``local:N`` (a :class:`distributed.LocalCluster` of N worker processes on this machine,
started for the study and closed after it). :func:`probes.engine.skeleton.run_plan` sends each job's
fit and predictions to a worker (:func:`fit_remote`) and yields the results **in the plan's
order**, so every table is built exactly as in a local run. In-memory feature matrices are
scattered once per job window (shared by the probes of a split); out-of-core rows
(:class:`probes.features.chunked.ChunkedRows`) travel as the store's URL and are read on the worker.

Each task runs with the torch / BLAS thread count of the submitting process for ``local:N`` (the
same arithmetic as the local run, so the same numbers) and with the worker's own thread count
(``nthreads``) on a remote cluster. The ``seconds`` of a fit are the worker's.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import numpy as np

from probes.engine.threads import limit_threads
from probes.errors import ProbeError

IN_FLIGHT_PER_WORKER = 2  # jobs submitted ahead per worker (bounds the matrices held for them)

_SCHEDULER: contextvars.ContextVar[str | None] = contextvars.ContextVar("probes_scheduler", default=None)


def parse_scheduler(spec: str) -> tuple[str, Any]:
    """``"local:N"`` -> ``("local", N)``; ``"tcp://host:port"`` (or ``tls://``...) -> ``("address", spec)``."""
    spec = str(spec).strip()
    if spec.startswith("local"):
        _, _, n = spec.partition(":")
        try:
            workers = int(n) if n else 2
        except ValueError:
            workers = 0
        if workers < 1:
            raise ProbeError(f"--scheduler '{spec}': write local:N with N >= 1 worker processes")
        return "local", workers
    if "://" in spec:
        return "address", spec
    raise ProbeError(f"--scheduler '{spec}' is neither tcp://HOST:PORT (a dask scheduler) nor local:N")


def current_scheduler() -> str | None:
    """The scheduler studies send their fits to now (None: fits run in this process)."""
    return _SCHEDULER.get()


@contextlib.contextmanager
def fit_scheduler(spec: str | None) -> Iterator[None]:
    """Run the block's studies with their fits on ``spec`` (see the module; None: locally)."""
    if spec:
        parse_scheduler(spec)  # a bad spec fails before any study starts
    token = _SCHEDULER.set(spec or None)
    try:
        yield
    finally:
        _SCHEDULER.reset(token)


@contextlib.contextmanager
def dask_client(spec: str) -> Iterator[tuple[Any, int | None]]:
    """``(client, threads)``: a client of ``spec`` and the thread count its tasks run with (None:
    the worker's own); a ``local:N`` cluster is started here and closed at the end."""
    try:
        from distributed import Client, LocalCluster
    except ImportError as e:
        raise ProbeError(f"--scheduler needs dask.distributed ({e}); pip install 'distributed'") from e
    kind, value = parse_scheduler(spec)
    if kind == "local":
        import torch

        with (
            LocalCluster(n_workers=value, threads_per_worker=1, processes=True, dashboard_address=None) as cluster,
            Client(cluster) as client,
        ):
            yield client, torch.get_num_threads()
        return
    try:
        client = Client(value, timeout="30s")
    except OSError as e:
        raise ProbeError(f"cannot reach the dask scheduler at {value}: {e}") from e
    with client:
        yield client, None


def fit_remote(
    job: Any,
    x_train: Any,
    x_tests: list[Any],
    device: str,
    make_probe: Callable[..., Any] | None,
    threads: int | None,
    fit: Callable[..., Any],
) -> Any:
    """A worker's task: ``fit(job, device, make_probe)`` (:func:`probes.engine.skeleton.fit_predict`, or
    :func:`probes.engine.proba_fits.fit_proba`) with the job's matrices passed apart (resolved by Dask);
    returns its result without the matrices."""

    if threads is None:
        from distributed import get_worker

        threads = int(get_worker().state.nthreads)
    full = dataclasses.replace(job, x_train=x_train, x_tests=list(x_tests))
    with limit_threads(threads):
        done = fit(full, device, make_probe)
    done.job = job  # the stub: the driver puts its own job (and matrices) back
    return done


def run_on_dask(
    jobs: Iterable[Any],
    spec: str,
    *,
    device: str,
    make_probe: Callable[..., Any] | None,
    advance: Callable[[str], None],
    fit: Callable[..., Any],
    ship_tag: bool = False,
) -> Iterator[Any]:
    """Every job as a task on ``spec``'s workers: ``fit(job, device, make_probe)`` (the study's fit function,
    e.g. :func:`probes.engine.skeleton.fit_predict`), results in job order. ``ship_tag`` sends the job's ``tag`` along
    (a fit that reads it, e.g. :func:`probes.engine.proba_fits.fit_proba`'s classes); otherwise it stays here."""
    if hasattr(make_probe, "kept"):  # probes.tuning.saving.AdapterKeeper: keeps the fitted estimators here
        raise ProbeError("--save-adapter keeps the fitted fine-tunes in this process; run it without --scheduler")
    with dask_client(spec) as (client, threads):
        n_workers = max(1, len(client.scheduler_info().get("workers", {})))
        window: deque = deque()
        scattered: dict[int, tuple[Any, Any]] = {}  # id(matrix) -> (matrix, future)

        def remote(x: Any) -> Any:
            if not isinstance(x, np.ndarray):  # out-of-core rows, token readers: sent as they are
                return x
            if id(x) not in scattered:
                scattered[id(x)] = (x, client.scatter(x, hash=False))
            return scattered[id(x)][1]

        def collect() -> Any:
            job, future = window.popleft()
            done = future.result()
            done.job = job
            advance(job.label)
            held = {id(x) for j, _ in window for x in (j.x_train, *j.x_tests)}
            for key in [k for k in scattered if k not in held]:
                del scattered[key]
            return done

        for job in jobs:
            stub = dataclasses.replace(job, x_train=None, x_tests=[], tag=job.tag if ship_tag else None)
            future = client.submit(
                fit_remote,
                stub,
                remote(job.x_train),
                [remote(x) for x in job.x_tests],
                device,
                make_probe,
                threads,
                fit,
                pure=False,
            )
            window.append((job, future))
            if len(window) >= IN_FLIGHT_PER_WORKER * n_workers:
                yield collect()
        while window:
            yield collect()
