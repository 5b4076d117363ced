"""Several `medclipsam` commands in one process: `python -m MedCLIPSAMLib.cli.chain SPEC.json` (the
service's training child, service/training_jobs.py).

SPEC is {"parent_pid": N, "steps": [[step name, [CLI arguments]], ...]}: the `medclipsam` commands of one
training (pseudo-label, then train-weak), run one after the other in this one interpreter (torch loads
once) through the CLI's own parser and code. Before each step it prints {"step": NAME} on stdout; the
steps print their `--progress json` lines. It stops at the first step that fails (its exit code) and
ends its whole process group when the service is gone.
"""

import json
import os
import signal
import sys
import threading
import time


def watch_parent(parent_pid, every=1.0):
    """A daemon thread that kills this process group once `parent_pid` is gone (a SIGKILLed service
    cannot stop its children: they stop themselves)."""
    from ..service.server import pid_alive

    def run():
        while pid_alive(parent_pid):
            time.sleep(every)
        print("medclipsam: the service that started this training is gone; stopping", file=sys.stderr)
        if os.name == "nt":
            os._exit(1)
        os.killpg(os.getpgid(0), signal.SIGKILL)

    threading.Thread(target=run, name="medclipsam-parent-watch", daemon=True).start()


def main(argv=None):
    from . import main as cli_main

    argv = sys.argv[1:] if argv is None else argv
    with open(argv[0], encoding="utf-8") as f:
        spec = json.load(f)
    if spec.get("parent_pid"):
        watch_parent(int(spec["parent_pid"]))
    for name, arguments in spec["steps"]:
        print(json.dumps({"step": name}), flush=True)
        code = cli_main([str(a) for a in arguments])
        if code:
            return code
    return 0


if __name__ == "__main__":
    sys.exit(main())
