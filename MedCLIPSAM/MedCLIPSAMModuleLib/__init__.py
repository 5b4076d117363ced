"""The Slicer module's parts, one concern a file. MedCLIPSAM.py keeps the Module, Widget, a thin Logic and
the self-test; panels/ holds the Qt sections of the panel; everything here needs neither Qt nor the Slicer
application (pytest runs it on slicer-core):

- the one backend: servicebackend.py (ServiceBackend, ServiceJob) over serviceclient.py (HTTP client,
  local/remote service launcher, trained-model and training calls); trainingjob.py (weak-supervision
  training at the service, its metrics chart); clickrefine.py (click refinement through the service);
- the scene: results.py (a finished run into the scene, SegmentationResult), evidenceview.py,
  panelstate.py (settings, volume watcher), prompts.py, choices.py, trained.py (this user's registry);
- setup: dependencies.py, devices.py, setupflow.py, modeljobs.py with setupprocess.py (model checks and
  downloads, the only processes the panel starts besides the local service), paths.py, i18n.py.

Nothing is imported here: each file is imported where it is used.
"""
