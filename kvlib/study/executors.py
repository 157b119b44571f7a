"""Where a stage's independent tasks run: one after the other here (the default), or as Ray tasks on a cluster.

A Ray task runs in a private temporary output directory on its worker (no shared filesystem needed): the files
it needs (the already stored cells of its group, the notebook it executes) are shipped with it, and the files it
writes that the driver asked for (cell files, windows files, the executed notebook) come back as
{relative path: bytes}. The driver, which alone holds the output directory's lock, writes each atomically where
a sequential run would, then rebuilds the tables the usual way (`rebuild_tables`).

Ray is optional (`pip install kvlib[ray]`): it is imported only when a Ray executor runs.
"""

from __future__ import annotations

import fcntl
import fnmatch
import functools
import os
import shutil
import socket
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path

from kvlib.files import TMP_SUFFIX, atomic_write
from kvlib.measure import KINDS
from kvlib.study.cells import LOCK_ENV, cell_folder, output_lock
from kvlib.study.runner import RunPlan, plan_run, run, write_tables
from kvlib.study.settings import Settings, validate

EXECUTORS = ("sequential", "ray")
# A task that raises, or whose worker dies, is run again this many times before it is reported as failed.
MAX_RETRIES = 2
# A local model directory up to this size travels to the workers through Ray's object store (the smoke preset's
# tiny model, ~30 MB); a larger one must be at the same path on every worker (shared filesystem or a copy).
SHIPPED_MODEL_BYTES = 200 * 2**20
# How long a run waits for the Ray cluster at --address to answer before it fails (--ray_timeout).
RAY_TIMEOUT_S = 30.0


@dataclass
class Task:
    """One independent unit of a stage. `work(private_dir)` does it in a private output directory (it must be
    picklable: a module-level function, or a functools.partial of one); `inputs` are placed there first; the
    files it writes that match `returns` (glob patterns of relative paths) are what it brings back."""

    name: str
    work: Callable[[Path], None]
    inputs: dict[str, bytes] = field(default_factory=dict)
    returns: tuple[str, ...] = ("cells/*/*/*.json", "windows/*.npy")
    cells: int = 0  # cells it has to measure (for the progress line)
    model: str | None = None  # a local model directory it needs at this path (shipped when small)


class TasksFailed(RuntimeError):
    """Tasks that still failed after their retries; what the others produced was stored."""

    def __init__(self, failed: dict[str, str], written: list[Path] | None = None):
        self.failed = failed
        self.written = written or []
        lines = "\n".join(f"  {name}: {error}" for name, error in failed.items())
        super().__init__(f"{len(failed)} task(s) failed (a task is retried {MAX_RETRIES} times first):\n{lines}")


class ClusterUnreachable(ValueError):
    """Nothing answers at the Ray address given (a bad input: the command line exits with code 2)."""


def _host_port(address: str) -> tuple[str, int] | None:
    """(host, port) of a Ray address such as 10.0.0.5:6379 or ray://head:10001; None for `auto` and the like."""
    host, colon, port = address.split("://", 1)[-1].rpartition(":")
    return (host.strip("[]"), int(port)) if colon and host and port.isdigit() else None


def check_address(address: str, timeout: float = RAY_TIMEOUT_S) -> None:
    """Fail within `timeout` seconds, naming the address, when no server accepts a connection there: `ray.init`
    itself keeps retrying an unreachable cluster for many minutes without a word. A refused connection is tried
    again every second until the timeout (a cluster may be starting)."""
    where = _host_port(address)
    if where is None:
        return
    deadline = time.monotonic() + timeout
    while True:
        left = deadline - time.monotonic()
        try:
            with socket.create_connection(where, timeout=max(0.1, min(left, 5.0))):
                return
        except OSError as error:
            if deadline - time.monotonic() <= 1.0:
                reason = error.strerror or type(error).__name__
                raise ClusterUnreachable(
                    f"cannot reach the Ray cluster at {address} within {timeout:g} s ({reason}); start it there "
                    "(ray start --head) or fix --address (without --address a local Ray instance is started)"
                ) from None
            time.sleep(1.0)


@contextmanager
def ray_session(address: str | None = None, timeout: float = RAY_TIMEOUT_S) -> Iterator[None]:
    """Connected to Ray for the block: the cluster at `address` (ClusterUnreachable when nothing answers there
    within `timeout` seconds), else a local Ray instance sized to this machine (one for a whole study: starting it
    takes seconds). Inside an existing connection, that one is used."""
    try:
        import ray
    except ImportError as error:
        raise ValueError("--executor ray needs Ray: pip install 'kvlib[ray]'") from error
    if ray.is_initialized():
        yield
        return
    if address:
        check_address(address, timeout)
        ray.init(address=address)
    else:
        # The dashboard is left off: progress is printed on the driver, and it costs a local run seconds and memory.
        ray.init(num_cpus=os.cpu_count(), include_dashboard=False)
    try:
        yield
    finally:
        ray.shutdown()


def task_resources(device: str, cpus: int = 1) -> dict:
    """One GPU per task when the study runs on CUDA, else `cpus` cores (its share; its torch threads match)."""
    if device.startswith("cuda"):
        return {"num_gpus": 1, "num_cpus": cpus}
    return {"num_cpus": cpus}


def run_on_ray(
    tasks: list[Task],
    output_dir: str | os.PathLike,
    device: str = "cpu",
    cpus: int = 1,
    address: str | None = None,
    log: Callable[[str], None] = print,
    started: float | None = None,
    timeout: float = RAY_TIMEOUT_S,
) -> tuple[list[Path], dict[str, str]]:
    """Run `tasks` as Ray tasks, as many at once as the cluster's resources allow, writing what each brings back
    into `output_dir` as it finishes. Returns (paths written, {task name: error} of the tasks that still failed
    after MAX_RETRIES retries); one failure never stops the others."""
    if not tasks:
        return [], {}
    import ray

    started = time.perf_counter() if started is None else started
    with ray_session(address, timeout):
        remote = ray.remote(_run_task).options(max_retries=MAX_RETRIES, retry_exceptions=True,
                                               **task_resources(device, cpus))  # fmt: skip
        models = {task.model for task in tasks if task.model}
        shipped = {model: _ship_model(model) for model in models}  # one copy in the object store, fetched if needed
        running = {}
        for task in tasks:
            # The reference is wrapped in a list so that Ray passes it through unresolved: a worker that has the
            # model at its path never fetches it.
            model = [task.model, [shipped[task.model]] if task.model else None]
            running[remote.remote(task.work, task.inputs, task.returns, model, cpus)] = task
        log(f"[ray] {len(tasks)} task(s) submitted ({_resources_line(ray)})")
        written: list[Path] = []
        failed: dict[str, str] = {}
        cells_total, cells_done = sum(task.cells for task in tasks), 0
        while running:
            ready, _ = ray.wait(list(running), num_returns=1)
            task = running.pop(ready[0])
            try:
                files = ray.get(ready[0])
            except Exception as error:  # the task's own error, or its worker's death, after its retries
                failed[task.name] = error_line(error)
                outcome = f"FAILED: {failed[task.name]}"
            else:
                written += store_files(files, output_dir)
                new = len(files)
                cells_done += sum(1 for relative in files if relative.startswith("cells/"))
                outcome = f"{new} file(s) back"
            done = len(tasks) - len(running) - len(failed)
            log(f"[ray] {task.name}: {outcome} | tasks {done} done, {len(running)} pending, {len(failed)} failed; "
                f"cells {cells_done}/{cells_total}; elapsed {time.perf_counter() - started:.0f} s")  # fmt: skip
        return list(dict.fromkeys(written)), failed  # a windows file comes back from every task of its dataset


def _resources_line(ray) -> str:
    resources = ray.cluster_resources()
    return ", ".join(f"{resources[key]:g} {key}" for key in ("CPU", "GPU") if key in resources) or "no resources"


def error_line(error: BaseException) -> str:
    """The last line of a task's error (Ray's message carries the whole remote traceback)."""
    lines = [line.strip() for line in str(error).strip().splitlines() if line.strip()]
    return lines[-1] if lines else type(error).__name__


def store_files(files: dict[str, bytes], output_dir: str | os.PathLike) -> list[Path]:
    """Write what a task brought back where a sequential run writes it, each file atomically."""
    root = Path(output_dir).resolve()
    written = []
    for relative, content in sorted(files.items()):
        path = (root / relative).resolve()
        if root not in path.parents:
            raise ValueError(f"a task returned {relative!r}, which is outside the output directory")
        with atomic_write(path, "wb") as handle:
            handle.write(content)
        written.append(path)
    return written


def _run_task(work, inputs: dict[str, bytes], returns: tuple[str, ...], model, cpus: int) -> dict[str, bytes]:
    """On the worker: a private output directory, the task's inputs in it, the work, the new files back."""
    import torch

    # Several tasks share a machine's cores: each uses its share, here and in the notebook kernel it launches.
    torch.set_num_threads(cpus)
    os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = str(cpus)
    # A local Ray instance inherits the driver's environment, which says the driver holds the output lock; the
    # task's own runs lock their private directory instead.
    os.environ.pop(LOCK_ENV, None)
    _ensure_model(*model)
    with _private_directory() as root:
        for relative, content in inputs.items():
            (root / relative).parent.mkdir(parents=True, exist_ok=True)
            (root / relative).write_bytes(content)
        work(root)
        found = {}
        for path in root.rglob("*"):
            relative = path.relative_to(root).as_posix()
            if not path.is_file() or path.name.endswith(TMP_SUFFIX) or inputs.get(relative) is not None:
                continue  # shipped inputs are not new
            if any(fnmatch.fnmatch(relative, pattern) for pattern in returns):
                found[relative] = path.read_bytes()
        return found


TASK_PREFIX = "kvlib-task-"


@contextmanager
def _private_directory() -> Iterator[Path]:
    """A task's private output directory, locked while the task runs. A worker killed mid-task leaves its
    directory behind; the next task on that machine removes every one whose lock nobody holds."""
    tmp = Path(tempfile.gettempdir())
    for lock in tmp.glob(f"{TASK_PREFIX}*.lock"):
        with open(lock, "a") as handle:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                continue  # a running task's
            shutil.rmtree(lock.with_suffix(""), ignore_errors=True)
            lock.unlink(missing_ok=True)
    fd, name = tempfile.mkstemp(prefix=TASK_PREFIX, suffix=".lock")
    with os.fdopen(fd, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)  # released by the system if this worker dies
        root = Path(name).with_suffix("")
        root.mkdir()
        try:
            yield root
        finally:
            shutil.rmtree(root, ignore_errors=True)
            Path(name).unlink(missing_ok=True)


def _ship_model(model: str):
    """A small local model directory into the object store (None for a hub id, a bundled name or a big model)."""
    import ray

    path = Path(model)
    if not path.is_dir():
        return None
    files = [p for p in path.rglob("*") if p.is_file()]
    if sum(p.stat().st_size for p in files) > SHIPPED_MODEL_BYTES:
        return None
    return ray.put({p.relative_to(path).as_posix(): p.read_bytes() for p in files})


def _ensure_model(model: str | None, shipped: list | None) -> None:
    """A local model directory the task needs, at the driver's path: there already (same machine or a shared
    filesystem), or written there from the shipped copy. The same path, because a cell records the model's name
    as given, and the tables match a result's rows by it."""
    if model is None or Path(model).exists():
        return
    if not shipped or shipped[0] is None:
        raise FileNotFoundError(
            f"model {model} is not on worker {socket.gethostname()} and is too big to ship: put it at the same "
            "path on every worker (or use a hub id)"
        )
    import ray

    files = ray.get(shipped[0])
    target = Path(model)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.", suffix=TMP_SUFFIX))
    for relative, content in files.items():
        (tmp / relative).parent.mkdir(parents=True, exist_ok=True)
        (tmp / relative).write_bytes(content)
    try:
        os.rename(tmp, target)  # complete or absent; a task beside this one may have put it there first
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        if not target.is_dir():
            raise


def stored_cell_files(output_dir: str | os.PathLike, model: str, dataset: str, kind: str) -> dict[str, bytes]:
    """The cells already stored for (model, dataset, kind), as task inputs: with them in its private directory a
    task skips what is stored and measures only its pending cells, exactly as a sequential run would."""
    folder = cell_folder(output_dir, model, dataset, kind)
    root = Path(output_dir)
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(folder.glob("*.json"))}


def rebuild_tables(settings: Settings, methods: list[str], ratios: list[float], kinds: list[str]) -> list[Path]:
    """The tables a run of these settings writes, from the stored cells (nothing is measured)."""
    planned = plan_run(settings, methods, ratios, kinds)
    return write_tables(planned.settings, planned.model_id, planned.datasets, kinds)


def rebuild_what_can_be(
    settings: Settings, methods: list[str], ratios: list[float], kinds: list[str]
) -> tuple[list[Path], dict[str, str]]:
    """`rebuild_tables`, and when that fails, the tables of each dataset on its own: one dataset that can no longer
    be planned (its text gone, a corrupt cell) never costs the others' tables. Returns (paths written, {what: error}
    of what could not be rebuilt); raises nothing a plan or a table can raise."""
    try:
        return rebuild_tables(settings, methods, ratios, kinds), {}
    except (ValueError, OSError) as error:
        if settings.dataset != "all":
            return [], {f"tables of {settings.dataset}": error_line(error)}
    written, failed = [], {}
    for dataset in settings.datasets():
        try:
            written += rebuild_tables(replace(settings, dataset=dataset), methods, ratios, kinds)
        except (ValueError, OSError) as error:
            failed[f"tables of {dataset}"] = error_line(error)
    return written, failed


def _measure_group(settings: Settings, methods: list[str], ratios: list[float], kind: str, private: Path) -> None:
    """On a worker: one (dataset, kind[, length]) group of a grid, into the private output directory."""
    run(replace(settings, output_dir=str(private)), methods, ratios, [kind], log=print)


def grid_tasks(
    settings: Settings, methods: list[str], ratios: list[float], kinds: list[str], planned: RunPlan | None = None
) -> list[Task]:
    """One task per (dataset, kind[, length]) group with pending cells. Groups, not single cells: a group is
    what one `measure` call shares work across (one prefill per window for all its presses, 1.56x faster than a
    prefill per cell; the latency baseline interleaved with its presses in the same rounds), so splitting it
    would cost time and change how its latencies were measured."""
    planned = planned or plan_run(settings, methods, ratios, kinds)
    settings = planned.settings  # device and dtype resolved here: every task gets the same
    model = settings.model if Path(settings.model).is_dir() else None
    tasks = []
    for plan in planned.datasets:
        for kind, pending in plan.pending.items():
            if not pending:
                continue
            group = replace(settings, dataset=plan.dataset)
            name = f"{plan.dataset} {kind}"
            if hasattr(KINDS[kind], "LENGTHS"):  # a swept kind: this length only (its cells are identified by it)
                group.lengths = [plan.length]
                name += f" at {plan.length}"
            inputs = stored_cell_files(settings.output_dir, settings.model, plan.dataset, kind)
            work = functools.partial(_measure_group, group, methods, ratios, kind)
            tasks.append(Task(name, work, inputs, cells=len(pending), model=model))
    return tasks


def run_grid_on_ray(
    settings: Settings,
    methods: list[str],
    ratios: list[float],
    kinds: list[str],
    address: str | None = None,
    log: Callable[[str], None] = print,
    timeout: float = RAY_TIMEOUT_S,
) -> list[Path]:
    """`study.run` with each pending group measured as a Ray task; the tables are rebuilt here afterwards.
    Raises TasksFailed when a task still failed, after storing what the others brought back and writing every
    table that can be written; an error rebuilding the tables then joins that report, never replaces it.
    An `address` where nothing answers fails within `timeout` seconds, before anything is planned."""
    validate(settings, methods, ratios, kinds)
    if address:
        check_address(address, timeout)
    planned = plan_run(settings, methods, ratios, kinds)  # before the lock: a rejected run leaves nothing behind
    with output_lock(settings.output_dir):
        planned.refresh_pending(methods, ratios)
        tasks = grid_tasks(settings, methods, ratios, kinds, planned)
        log(f"{settings.model}: {sum(t.cells for t in tasks)} cell(s) to run in {len(tasks)} task(s)")
        device = planned.settings.device
        written, failed = run_on_ray(tasks, settings.output_dir, device, address=address, log=log, timeout=timeout)
        if failed:
            tables, not_rebuilt = rebuild_what_can_be(settings, methods, ratios, kinds)
            written += tables
            failed |= not_rebuilt
        else:
            written += rebuild_tables(settings, methods, ratios, kinds)
    if failed:
        raise TasksFailed(failed, written)
    return written
