"""The Ray executor on a local 2-CPU Ray instance: the same files and numbers as the sequential study, and a
failing task retried, then reported by name while the others finish."""

import functools
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import ray  # an optional dependency of kvlib; setup.sh installs it for the tests (requirements-dev.txt)

from kvlib import pipeline
from kvlib.study import executors

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def local_ray():
    """One local Ray instance with 2 CPUs for this module (starting one takes seconds)."""
    # The fake tasks below live in this test module, which workers cannot import by name: send them by value.
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    ray.init(num_cpus=2, include_dashboard=False)
    yield
    ray.shutdown()


def test_kvlib_imports_without_ray():
    blocked = "import sys; sys.modules['ray'] = None; import kvlib.cli, kvlib.pipeline, kvlib.study.executors"
    subprocess.run([sys.executable, "-c", blocked], check=True, cwd=REPO)


def _writes_a_cell(name: str, private: Path) -> None:
    assert (private / "cells" / "m_d" / "ppl" / "stored.json").read_text() == "{}"  # its shipped input
    (private / "cells" / "m_d" / "ppl" / f"{name}.json").write_text(json.dumps({"name": name}))
    (private / "m_d_kv_metrics.csv").write_text("not asked for")


def _always_fails(attempts: Path, private: Path) -> None:
    with open(attempts, "a") as handle:
        handle.write("attempt\n")
    raise ValueError("compression_ratio 1.5 is impossible")


def _dies_once(attempts: Path, private: Path) -> None:
    with open(attempts, "a") as handle:
        handle.write("attempt\n")
    if attempts.read_text().count("attempt") == 1:
        os._exit(1)  # the worker process dies, as when its machine goes away
    (private / "cells" / "m_d" / "ppl" / "c.json").parent.mkdir(parents=True)
    (private / "cells" / "m_d" / "ppl" / "c.json").write_text("{}")


def test_a_task_asks_for_a_gpu_on_cuda_and_its_cpu_share_otherwise():
    assert executors.task_resources("cuda:0") == {"num_gpus": 1, "num_cpus": 1}
    assert executors.task_resources("cpu", cpus=2) == {"num_cpus": 2}


def test_a_failing_task_is_retried_then_reported_by_name_while_the_others_finish(local_ray, tmp_path):
    attempts, deaths = tmp_path / "attempts.txt", tmp_path / "deaths.txt"
    stored = {"cells/m_d/ppl/stored.json": b"{}"}
    tasks = [
        executors.Task("good a", functools.partial(_writes_a_cell, "a"), stored, cells=1),
        executors.Task("impossible", functools.partial(_always_fails, attempts), cells=1),
        executors.Task("good b", functools.partial(_writes_a_cell, "b"), stored, cells=1),
        executors.Task("worker dies", functools.partial(_dies_once, deaths), cells=1),
    ]
    lines = []
    output = tmp_path / "out"
    written, failed = executors.run_on_ray(tasks, output, log=lines.append)

    assert attempts.read_text().count("attempt") == 1 + executors.MAX_RETRIES
    assert deaths.read_text().count("attempt") == 2  # run again on a new worker
    assert list(failed) == ["impossible"]
    assert "ValueError: compression_ratio 1.5 is impossible" in failed["impossible"]
    # The others' new files came back (not their shipped input, not files they were not asked for).
    cells = sorted(p.relative_to(output).as_posix() for p in output.rglob("*") if p.is_file())
    assert cells == ["cells/m_d/ppl/a.json", "cells/m_d/ppl/b.json", "cells/m_d/ppl/c.json"]
    assert sorted(written) == sorted(output.resolve() / cell for cell in cells)
    print("\n".join(lines))
    assert "tasks 3 done, 0 pending, 1 failed; cells 3/4" in lines[-1]
    assert any("impossible: FAILED" in line for line in lines)

    error = executors.TasksFailed(failed)
    assert "impossible: ValueError: compression_ratio 1.5 is impossible" in str(error)


def _cells(output: Path) -> dict[str, dict]:
    return {p.relative_to(output).as_posix(): json.loads(p.read_text()) for p in output.glob("cells/*/*/*.json")}


@pytest.mark.slow
def test_smoke_study_on_ray_matches_the_sequential_run(local_ray, tmp_path, smoke_study):
    sequential, completed, _ = smoke_study
    assert completed.returncode == 0, completed.stderr[-3000:]
    output = tmp_path / "smoke-ray"
    lines = []
    pipeline.run_preset("smoke", str(output), log=lines.append, executor="ray")
    print("\n".join(line for line in lines if line.startswith("[ray]")))

    def files(root: Path) -> list[str]:
        kept = ("cells/", "windows/", "notebooks/", "plots/")
        return sorted(
            p.relative_to(root).as_posix()
            for p in root.rglob("*")
            if p.is_file() and (p.parent == root or p.relative_to(root).as_posix().startswith(kept))
        )

    assert files(output) == files(sequential)
    for path in sequential.glob("windows/*.npy"):
        assert (output / "windows" / path.name).read_bytes() == path.read_bytes()
    ours, theirs = _cells(output), _cells(sequential)
    assert ours.keys() == theirs.keys() and len(ours) > 0  # same identities: same model, text and settings
    for name, cell in theirs.items():
        ray_cell = ours[name]
        if cell["kind"] in ("ppl", "retrieval"):  # NLL sums, cache lengths, greedy answers: bit-identical
            assert ray_cell["records"] == cell["records"], name
            assert ray_cell["effective_ratio"] == cell["effective_ratio"], name
        elif cell["kind"] == "streaming":  # every token's NLL and the cache held: bit-identical
            for ray_reading, reading in zip(ray_cell["readings"], cell["readings"], strict=True):
                assert ray_reading["records"] == reading["records"], name
        else:  # timings differ run to run; what was timed does not
            assert [r["kv_bytes"] for r in ray_cell["runs"]] == [r["kv_bytes"] for r in cell["runs"]], name
        columns = {k: v for k, v in cell["identity_columns"].items() if k != "model"}  # the output dir differs
        assert {k: v for k, v in ray_cell["identity_columns"].items() if k != "model"} == columns
    for table in sequential.glob("*_kv_metrics.csv"):
        expected, got = pd.read_csv(table), pd.read_csv(output / table.name)
        assert np.array_equal(got["ppl"].to_numpy(), expected["ppl"].to_numpy()), table.name
    tasks, cells = 8, len(theirs)  # 8 measuring notebooks: the smoke preset's (dataset, kind) pairs
    lines_expected = 2 + 2 + tasks  # two "submitted" lines, one per preparation, one per measuring notebook
    assert sum(line.startswith("[ray]") and "FAILED" not in line for line in lines) == lines_expected
    last = [line for line in lines if "[ray]" in line][-1]
    assert f"tasks {tasks} done, 0 pending, 0 failed; cells {cells}/{cells}" in last
