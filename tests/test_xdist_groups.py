"""`make test` runs with `--dist loadgroup`: the tests of one `xdist_group` must share one worker.

The PyTorch parity modules compute every case in one session fixture per worker; if the grouping
silently stops working (a pytest / pytest-xdist pairing that ignores it, as pytest 9.2 with
pytest-xdist 3.8), every worker computes them all again. This runs a small grouped module on two
workers and checks where its tests ran.
"""

import os
import subprocess
import sys

import pytest

MODULE = '''
import os
import pytest

pytestmark = pytest.mark.xdist_group("one")


@pytest.mark.parametrize("i", range(8))
def test_grouped(i):
    with open(os.path.join(os.environ["WORKERS_DIR"], f"{i}"), "w") as f:
        f.write(os.environ.get("PYTEST_XDIST_WORKER", "none"))


@pytest.mark.parametrize("i", range(8))
def test_free(i):
    pass
'''


@pytest.mark.slow  # a second pytest on two workers (~10 s); `make test-fast` sends whole files to a worker anyway
def test_grouped_tests_share_one_worker(tmp_path):
    (tmp_path / "test_module.py").write_text(MODULE)
    workers = tmp_path / "workers"
    workers.mkdir()
    env = dict(os.environ, WORKERS_DIR=str(workers))
    done = subprocess.run([sys.executable, "-m", "pytest", "-n", "2", "--dist", "loadgroup", "-p", "no:cacheprovider",
                           "-q", "test_module.py"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    ran_on = {(workers / name).read_text() for name in os.listdir(workers)}
    assert len(os.listdir(workers)) == 8 and len(ran_on) == 1, (
        f"the grouped tests ran on workers {sorted(ran_on)}: pytest-xdist's loadgroup is not in effect "
        "with this pytest (see the pin in setup.cfg)")
