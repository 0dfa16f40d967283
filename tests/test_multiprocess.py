"""Multi-process training with ``jax.distributed`` (issue 19): two processes on localhost.

Two worker processes (``tests/multiprocess_worker.py``, CPU, 2 devices each) join with
``jax.distributed.initialize`` and run 5 ``adamw_8bit`` steps on a tree sharded over the 4
global devices; a third process runs the same steps alone on 4 devices. The gathered
parameters and optimizer states must be equal bit for bit. Each worker builds its optimizer
before ``jax.distributed.initialize``, which fails if building it started a backend.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import optax

from tests import multiprocess_worker as worker

WORKER = Path(__file__).with_name("multiprocess_worker.py")
ROOT = WORKER.parent.parent
TIMEOUT_S = 120


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def _start(args, devices: int, log: Path) -> tuple[subprocess.Popen, Path]:
    env = dict(os.environ, JAX_PLATFORMS="cpu", OPENBLAS_NUM_THREADS="1",
               XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
    env.pop("JAX_ENABLE_X64", None)
    with open(log, "wb") as f:  # the child keeps its own descriptor
        proc = subprocess.Popen([sys.executable, str(WORKER), *args], cwd=ROOT, env=env,
                                stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
    return proc, log


def _run_all(jobs: dict[str, tuple[subprocess.Popen, Path]]) -> None:
    """Wait for every job (``TIMEOUT_S`` in all); always kill what is left; on a failure,
    raise with each job's exit status and output."""
    deadline = time.monotonic() + TIMEOUT_S
    why = f"killed: still running after the {TIMEOUT_S} s limit"
    try:
        while any(p.poll() is None for p, _ in jobs.values()):
            if time.monotonic() > deadline:
                break
            if any(p.poll() not in (None, 0) for p, _ in jobs.values()):
                why = "killed after another worker failed"
                time.sleep(2)  # give the others a moment to report their side, then stop
                break
            time.sleep(0.1)
    finally:
        for proc, _ in jobs.values():
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    if any(p.returncode != 0 for p, _ in jobs.values()):
        report = "\n".join(
            f"--- {name}: exit status {p.returncode}"
            f"{' (' + why + ')' if p.returncode == -signal.SIGKILL else ''}"
            f"\n{log.read_text(errors='replace')[-4000:]}" for name, (p, log) in jobs.items())
        raise AssertionError(f"a multi-process worker failed:\n{report}")


def test_two_processes_equal_one_process(tmp_path):
    port = _free_port()
    mp_out, ref_out = tmp_path / "two.npz", tmp_path / "one.npz"
    jobs = {
        f"process {i} of 2": _start(["--num-processes", "2", "--process-id", str(i),
                                     "--port", str(port), "--out", str(mp_out)],
                                    2, tmp_path / f"p{i}.log")
        for i in range(2)
    }
    jobs["one process, 4 devices"] = _start(["--num-processes", "1", "--out", str(ref_out)],
                                            4, tmp_path / "ref.log")
    _run_all(jobs)

    two, one = np.load(mp_out), np.load(ref_out)
    assert sorted(two.files) == sorted(one.files)
    # the whole state was gathered: a count, and codes + scales of both moments of 3 leaves
    assert len(one.files) == 3 + 1 + 2 * 3 * 2
    for name in one.files:
        assert two[name].dtype == one[name].dtype and two[name].shape == one[name].shape, name
        assert np.array_equal(two[name], one[name]), (
            f"{name}: two processes differ from one in "
            f"{np.count_nonzero(two[name] != one[name])} of {one[name].size} elements")
    assert int(one["['state'][0].count"]) == worker.STEPS

    # Not a trivial agreement: the steps did what optax.adamw does, up to the 8-bit moments.
    # Each step moves a parameter by at most ~lr = 1e-2 (5 steps: up to 5e-2, asserted
    # > 2e-2). The 8-bit maps keep elements far below their block's maximum to a few
    # significant bits, and a row's gradient scale changes from step to step here (one to
    # four decades), so an update can be off by a good part of lr: measured at most 5.3e-3
    # after 5 steps; the bound 1e-2 is a fifth of the largest movement.
    params = worker._arrays(0)
    opt = optax.adamw(learning_rate=1e-2, weight_decay=1e-2)
    state = opt.init(params)
    ref = params
    for t in range(worker.STEPS):
        updates, state = opt.update(worker._arrays(100 + t), state, ref)
        ref = optax.apply_updates(ref, updates)
    for layer, leaves in ref.items():
        for leaf, want in leaves.items():
            got = one[f"['params']['{layer}']['{leaf}']"]
            moved = np.abs(np.asarray(want) - params[layer][leaf])
            assert moved.max() > 2e-2, (layer, leaf)
            np.testing.assert_allclose(got, want, atol=1e-2, rtol=0, err_msg=f"{layer}/{leaf}")
