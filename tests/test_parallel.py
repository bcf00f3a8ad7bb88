"""Data parallelism: 1 vs 8 devices give the same training; two processes agree with one."""

import json
import os
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest
from parallel_case import run_steps

from saljax import parallel

HERE = os.path.dirname(os.path.abspath(__file__))
# Sharding changes the order of floating-point sums (and of BatchNorm's batch statistics), so
# results agree to rounding, not bitwise.
RTOL, ATOL = 2e-5, 1e-6


def _assert_same(a, b):
    (loss_a, params_a), (loss_b, params_b) = a, b
    np.testing.assert_allclose(loss_a, loss_b, rtol=RTOL, atol=ATOL)
    assert params_a.keys() == params_b.keys()
    for key in params_a:
        np.testing.assert_allclose(params_a[key], params_b[key], rtol=RTOL, atol=ATOL, err_msg=key)


@pytest.mark.slow  # ~12 s on 2 cores
def test_one_and_eight_devices_train_alike():
    assert jax.device_count() == 8
    one = run_steps(parallel.make_mesh(1))
    eight = run_steps(parallel.make_mesh(8))
    _assert_same(one, eight)
    assert one[0][-1] != one[0][0]  # it trained


def test_mesh_and_batch_checks():
    with pytest.raises(ValueError, match=r"num_devices must lie in \[1, 8\]"):
        parallel.make_mesh(9)
    with pytest.raises(ValueError, match="batch_size 12 must be divisible by the number of devices 8"):
        parallel.check_batch_size(12, parallel.make_mesh(8))


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow  # two Python processes, each starting JAX and compiling the step
def test_two_processes_agree_with_one(tmp_path):
    port = _free_port()
    # os.environ carries the tests' XLA_FLAGS (tests/conftest.py): the workers compile as this process does.
    env = dict(os.environ, PYTHONPATH=HERE + os.pathsep + os.environ.get("PYTHONPATH", ""))
    outs = [tmp_path / f"p{i}.json" for i in range(2)]
    procs = [subprocess.Popen([sys.executable, os.path.join(HERE, "distributed_worker.py"), str(i), str(port), str(o)],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT) for i, o in enumerate(outs)]
    logs = []
    for p in procs:
        try:
            logs.append(p.communicate(timeout=300)[0].decode(errors="replace"))
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            raise
    for p, log in zip(procs, logs):
        assert p.returncode == 0, log[-3000:]
    results = [json.loads(o.read_text()) for o in outs]
    assert all(r["process_count"] == 2 and r["devices"] == 4 for r in results)
    as_arrays = [(r["losses"], {k: np.asarray(v) for k, v in r["params"].items()}) for r in results]
    _assert_same(as_arrays[0], as_arrays[1])
    _assert_same(as_arrays[0], run_steps(parallel.make_mesh(1)))
