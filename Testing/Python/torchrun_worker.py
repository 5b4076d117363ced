"""A torchrun worker for the tests: `medclipsam ARGS`, then exit 3 if the command left its process group
open. A gloo group still alive at interpreter exit aborts the worker now and then (SIGABRT, "terminate
called without an active exception"), so leaving it open is a bug even in a run that happened to pass."""

import sys

import torch.distributed as dist

from MedCLIPSAMLib.cli import main

code = main(sys.argv[1:])
if dist.is_initialized():
    print("torchrun_worker: the command returned with its process group still open", file=sys.stderr)
    dist.destroy_process_group()
    code = 3
sys.exit(code)
