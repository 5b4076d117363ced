"""The Slicer module's parts that need neither Qt nor the Slicer application: processes, jobs, command
lines, dependency checks, devices, settings and scene bookkeeping, one concern per file. The module file
(MedCLIPSAM.py) keeps the Module, Widget, a thin Logic and the self-test; pytest runs these with slicer-core.
Nothing is imported here: each file is imported where it is used.
"""
