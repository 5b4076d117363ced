"""Speed and accuracy scripts (python -m benchmarks.NAME): tables and JSON, never part of the tests."""
