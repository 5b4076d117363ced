"""The MedCLIP-SAM papers' tables on the public data sets, with this project's pipeline (issue 36).

published.py  the papers' figures as data, with their sources
datasets.py   readers for each data set's published folder layout, and the splits
stages.py     the table's rows (zero-shot v1/v2, weak supervision, the ablation) as presets and flags
run.py        running a stage on the cases, scored with MedCLIPSAMLib.metrics, cached per case
__main__.py   the command line, the table and the JSON record (schema: benchmarks/README.md)
"""
