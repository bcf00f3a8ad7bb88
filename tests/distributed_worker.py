"""One process of the two-process data-parallel test (run by tests/test_parallel.py).

    python tests/distributed_worker.py PROCESS_ID PORT OUT.json
"""

import json
import sys

import jax

jax.config.update("jax_num_cpu_devices", 2)

from saljax import parallel  # noqa: E402

process_id, port, out_path = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
parallel.initialize_distributed(f"127.0.0.1:{port}", num_processes=2, process_id=process_id)

import numpy as np  # noqa: E402
from parallel_case import GLOBAL_BATCH, run_steps  # noqa: E402

mesh = parallel.make_mesh()  # 4 devices over 2 processes
half = GLOBAL_BATCH // 2
losses, params = run_steps(mesh, rows=slice(process_id * half, (process_id + 1) * half))
with open(out_path, "w") as f:
    json.dump({"process_count": jax.process_count(), "devices": jax.device_count(), "losses": losses,
               "params": {k: np.asarray(v).tolist() for k, v in params.items()}}, f)
jax.distributed.shutdown()
