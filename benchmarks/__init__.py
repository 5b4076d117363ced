"""Speed and accuracy scripts (python -m benchmarks.NAME): tables and JSON, never part of the tests."""


def write_record(path, record):
    """Write a benchmark's record as JSON: whole or not at all (a run stopped mid-write leaves the previous
    record), its folder made first; numpy scalars are written as floats."""
    import json
    import os

    from MedCLIPSAMLib.runtime import atomic_output

    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with atomic_output(path) as tmp, open(tmp, "w") as f:
        json.dump(record, f, indent=2, default=float)
        f.write("\n")
