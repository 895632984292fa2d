"""One process of a localhost `jax.distributed` training run (see realrun_distributed_test.py).

argv: PROCESS_ID NUM_PROCESSES PORT WORKDIR ARGS_JSON. Prints one JSON line: what this process
wrote (shared files and metric rows) and its final step.
"""
import os
import sys

pid, nproc, port, workdir, args_json = sys.argv[1:]
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                           f" --xla_force_host_platform_device_count={2 // int(nproc)}")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import json  # noqa: E402

import jax  # noqa: E402

jax.config.update("jax_cpu_collectives_implementation", "gloo")
jax.config.update("jax_default_matmul_precision", "highest")
if int(nproc) > 1:
  jax.distributed.initialize(f"localhost:{port}", int(nproc), int(pid))

from jaxlab import paths, run_metrics  # noqa: E402
from jaxlab.config import parse_argv  # noqa: E402
from jaxlab.data import tokenizer as tok_lib  # noqa: E402
from jaxlab.train import runner  # noqa: E402

written = []
real_write_text = paths.write_text


def write_text(p, text):
  if paths.is_writer():
    written.append(os.path.basename(str(p)))
  return real_write_text(p, text)


real_save_dir = tok_lib._save_dir  # pylint: disable=protected-access


def save_dir(tok, out_dir, record):
  if paths.is_writer():
    written.append("tokenizer/")
  return real_save_dir(tok, out_dir, record)


rows = []
real_write = run_metrics.MetricsWriter.write


def write(self, step, values):
  if self.writer:
    rows.append(int(step))
  return real_write(self, step, values)


paths.write_text = write_text
tok_lib._save_dir = save_dir  # pylint: disable=protected-access
run_metrics.MetricsWriter.write = write
config, workdir = parse_argv(json.loads(args_json) + [f"--workdir={workdir}"])
out = runner.run(config, workdir)
print("RESULT " + json.dumps({"process": jax.process_index(), "devices": jax.device_count(),
                              "written": sorted(written), "metric_rows": rows,
                              "step": int(jax.device_get(out["state"].step))}), flush=True)
