"""Sweeps: a grid of run configs, executed in a process pool (or on Ray), stored in SQLite.

A sweep file is TOML::

    name = "quickstart"
    [base]                 # fields shared by every run (any RunConfig field)
    steps = 1500
    train_length = "1:20"
    [grid]                 # every combination of these lists
    task = ["copy", "reverse"]
    pe = ["nope", "rope"]
    seed = [0, 1]

A grid key ``variant`` takes tables of fields that go together, e.g. an id scheme and its
parameters: ``variant = [{positions = "contiguous"}, {positions = "randomized",
positions_params = {max_len = 256}}]``; each table is merged into the run's fields.

Every config is validated before any run starts. Finished runs (by config hash) are skipped,
so an interrupted sweep resumes where it stopped.
"""

from __future__ import annotations

import itertools
import os
import traceback
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from multiprocessing import get_context
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError
from tqdm.auto import tqdm

from poslab.config import ConfigError, RunConfig, format_validation_error, load_toml
from poslab.store import ResultStore

__all__ = ["SweepSpec", "load_sweep", "expand", "run_sweep", "EXECUTORS"]

EXECUTORS = ("local", "ray")


class SweepSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field("sweep", min_length=1)
    base: dict[str, Any] = Field(default_factory=dict)
    grid: dict[str, list[Any]] = Field(default_factory=dict)


def load_sweep(path: str | Path) -> SweepSpec:
    """Read and validate a sweep file (every run config included)."""
    try:
        spec = SweepSpec(**load_toml(path))
    except ValidationError as err:
        raise ConfigError(f"{path}: " + format_validation_error(err, "sweep file", SweepSpec)) from None
    expand(spec)
    return spec


def expand(spec: SweepSpec) -> list[RunConfig]:
    """All configs of the grid, validated; duplicates (same hash) kept once, in grid order."""
    for key, values in spec.grid.items():
        if not values:
            raise ConfigError(f"grid.{key} is empty; give at least one value")
    keys = list(spec.grid)
    configs, seen = [], set()
    for combo in itertools.product(*(spec.grid[k] for k in keys)) if keys else [()]:
        fields = {**spec.base}
        for key, value in zip(keys, combo):
            if key == "variant":
                if not isinstance(value, dict):
                    raise ConfigError(f"grid.variant entries must be tables of fields, got {value!r}")
                fields.update(value)
            else:
                fields[key] = value
        try:
            config = RunConfig.create(**fields)
        except ConfigError as err:
            where = ", ".join(f"{k}={v!r}" for k, v in zip(keys, combo))
            raise ConfigError(f"sweep {spec.name!r}, run ({where}):\n{err}") from None
        if config.run_id() not in seen:
            seen.add(config.run_id())
            configs.append(config)
    return configs


def _work(config_dict: dict[str, Any], run_dir: str, threads: int, checkpoint_every: int = 500) -> dict[str, Any]:
    """Worker entry point (top level so it pickles)."""
    from poslab.runner import execute

    return execute(RunConfig(**config_dict), run_dir=run_dir, progress=False, threads=threads,
                   checkpoint_every=checkpoint_every)  # fmt: skip


def run_sweep(
    spec: SweepSpec,
    store: ResultStore,
    runs_dir: str | Path = "runs",
    executor: str = "local",
    workers: int | None = None,
    address: str | None = None,
    progress: bool = True,
    checkpoint_every: int = 500,
) -> dict[str, Any]:
    """Run every unfinished config of ``spec``; return counts and the sweep's run ids.

    Args:
        spec: the sweep.
        store: where records go (the parent process writes, one transaction per run).
        runs_dir: run directories (config, checkpoints, record) live under it.
        executor: ``"local"`` (process pool) or ``"ray"``.
        workers: parallel runs (default: the number of CPU cores, at most the runs).
        address: Ray cluster address (``"auto"``, ``"ray://host:port"``; default: local).
        progress: show a progress bar over runs with ETA.
        checkpoint_every: steps between a run's checkpoints (a killed run resumes from its last).
    """
    if isinstance(workers, bool) or (workers is not None and (not isinstance(workers, int) or workers < 1)):
        raise ConfigError(f"workers must be an integer >= 1, got {workers!r}")
    check_executor(executor, address)
    configs = expand(spec)
    store.add_to_sweep(spec.name, [c.run_id() for c in configs])  # runs finished elsewhere belong to it too
    done = store.done_ids()
    todo = [c for c in configs if c.run_id() not in done]
    summary = {
        "sweep": spec.name,
        "total": len(configs),
        "skipped": len(configs) - len(todo),
        "finished": 0,
        "failed": 0,
        "run_ids": [c.run_id() for c in configs],
        "errors": {},
    }
    if not todo:
        return summary
    cores = os.cpu_count() or 1
    workers = max(1, min(workers or cores, len(todo)))
    threads = max(1, cores // workers)
    runs_dir = Path(runs_dir)
    bar = tqdm(
        total=len(configs),
        initial=summary["skipped"],
        desc=f"sweep {spec.name}",
        unit="run",
        disable=not progress,
        dynamic_ncols=True,
    )

    def record_result(config: RunConfig, outcome: dict[str, Any] | BaseException) -> None:
        if isinstance(outcome, BaseException):
            msg = "".join(traceback.format_exception_only(type(outcome), outcome)).strip()
            store.fail(config.run_id(), config.canonical(), msg, spec.name)
            summary["failed"] += 1
            summary["errors"][config.run_id()] = msg
        else:
            store.finish(config.run_id(), config.canonical(), outcome, spec.name)
            summary["finished"] += 1
        bar.update(1)

    if executor == "ray":
        for config in todo:
            store.mark_running(config.run_id(), config.canonical(), spec.name)
        _run_ray(todo, runs_dir, threads, address, record_result, checkpoint_every)
    else:
        _run_local(todo, runs_dir, workers, threads, spec.name, store, record_result, checkpoint_every)
    bar.close()
    return summary


def check_executor(executor: str, address: str | None) -> None:
    """Refuse an unknown executor, an address without Ray, or a Ray address that does not
    answer (:func:`_check_ray_address`): before the database or any run folder is made."""
    if executor not in EXECUTORS:
        raise ConfigError(f"executor={executor!r} is not one of {', '.join(EXECUTORS)}")
    if address is not None and executor != "ray":
        raise ConfigError(f"--address {address!r} is for the Ray executor; add --executor ray")
    if executor == "ray":
        _check_ray_address(address)


WORKER_RETRIES = 2  # times a run is started again after its worker died under it


def _new_pool(workers: int) -> ProcessPoolExecutor:
    return ProcessPoolExecutor(
        max_workers=workers, mp_context=get_context("spawn"), initializer=_die_with_parent, initargs=(os.getpid(),)
    )


def _run_local(
    todo, runs_dir: Path, workers: int, threads: int, sweep: str, store, record_result, checkpoint_every: int = 500
) -> None:
    """One run per worker in flight: a run is marked running (with its start time) when it
    starts, so the table never shows queued runs as running. A worker that dies (killed, out
    of memory) breaks the pool: the pool is made again and the runs that were in flight start
    again, resuming from their checkpoints, up to ``WORKER_RETRIES`` times each."""
    queue = list(reversed(todo))
    attempts: dict[str, int] = {}
    pool = _new_pool(workers)
    try:
        pending: dict = {}
        while queue or pending:
            while queue and len(pending) < workers:
                config = _next_run(queue, runs_dir)
                store.mark_running(config.run_id(), config.canonical(), sweep)
                run_dir = str(runs_dir / config.run_id())
                pending[pool.submit(_work, config.canonical(), run_dir, threads, checkpoint_every)] = config
            finished, _ = wait(pending, return_when=FIRST_COMPLETED)
            broken = False
            for fut in finished:
                config = pending.pop(fut)
                exc = fut.exception()
                if isinstance(exc, BrokenProcessPool):
                    broken = True
                    _retry_or_fail(config, attempts, queue, record_result)
                else:
                    record_result(config, exc if exc is not None else fut.result())
            if broken:  # every run still in flight died with the pool
                for config in pending.values():
                    _retry_or_fail(config, attempts, queue, record_result)
                pending = {}
                pool.shutdown(wait=False, cancel_futures=True)
                pool = _new_pool(workers)
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def _next_run(queue: list[RunConfig], runs_dir: Path) -> RunConfig:
    """The next queued run (the queue's end) that no other process is computing now; if every
    queued run is leased elsewhere (an overlapping sweep), the next one: its worker waits for
    the lease and returns the record the other process wrote, computing nothing twice."""
    from poslab.runner import is_leased

    for i in range(len(queue) - 1, -1, -1):
        if not is_leased(runs_dir / queue[i].run_id()):
            return queue.pop(i)
    return queue.pop()


def _retry_or_fail(config: RunConfig, attempts: dict[str, int], queue: list, record_result) -> None:
    run_id = config.run_id()
    attempts[run_id] = attempts.get(run_id, 0) + 1
    if attempts[run_id] > WORKER_RETRIES:
        record_result(config, RuntimeError(f"the worker running {run_id} died {attempts[run_id]} times; given up"))
    else:
        queue.append(config)  # next to start; it resumes from its last checkpoint


def _die_with_parent(parent: int) -> None:
    """Worker initializer: end this worker when the sweep that started it is gone (killed with
    SIGKILL, say), instead of waiting on its queue forever."""
    import threading
    import time

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(0.5)
        os._exit(1)

    threading.Thread(target=watch, daemon=True, name="poslab-parent-watch").start()


RAY_CONNECT_TIMEOUT = 10.0  # seconds to reach a cluster's address before giving up


def _check_ray_address(address: str | None) -> None:
    """A ``host:port`` (or ``ray://host:port``) address must answer within
    ``RAY_CONNECT_TIMEOUT`` seconds: ``ray.init`` itself retries an unreachable one forever."""
    if not address or address in ("auto", "local"):
        return
    target = address.removeprefix("ray://")
    host, sep, port = target.rpartition(":")
    if not sep or not port.isdigit():
        raise ConfigError(f"--address {address!r} is not 'auto', 'host:port' or 'ray://host:port'")
    import socket

    try:
        socket.create_connection((host or "127.0.0.1", int(port)), timeout=RAY_CONNECT_TIMEOUT).close()
    except OSError as err:
        raise ConfigError(
            f"no Ray cluster answers at --address {address!r} within {RAY_CONNECT_TIMEOUT:.0f} s ({err}); "
            "start one (ray start --head) or leave --address out for a local one"
        ) from None


def _run_ray(
    todo, runs_dir: Path, threads: int, address: str | None, record_result, checkpoint_every: int = 500
) -> None:
    try:
        import ray
    except ImportError:
        raise ConfigError("executor 'ray' needs Ray: pip install 'poslab[ray]'") from None
    started = not ray.is_initialized()
    if started:
        ray.init(address=address, include_dashboard=False, log_to_driver=False)
    try:
        # a worker that dies (killed, out of memory) is a system failure: Ray starts the task
        # again, and it resumes from the run's checkpoint, as the local pool does
        remote = ray.remote(num_cpus=threads, max_retries=WORKER_RETRIES, retry_exceptions=False)(_work)
        refs = {
            remote.remote(c.canonical(), str(runs_dir.resolve() / c.run_id()), threads, checkpoint_every): c
            for c in todo
        }
        while refs:
            ready, _ = ray.wait(list(refs), num_returns=1)
            for ref in ready:
                config = refs.pop(ref)
                try:
                    record_result(config, ray.get(ref))
                except Exception as exc:  # a failed run is recorded, the sweep goes on
                    record_result(config, exc)
    finally:
        if started:
            ray.shutdown()
