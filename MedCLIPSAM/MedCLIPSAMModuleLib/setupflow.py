"""What happens before the first run, without waiting on the GUI thread: Python packages that are missing
or too old are installed (after asking), then the zero-shot models are verified by a background
`medclipsam models verify` (reading gigabytes for the checksums), downloaded when the user agrees, and
finally the run starts. The panel supplies the dialogs and polls `job` from its timer."""

from . import dependencies
from .i18n import tr as _
from .modeljobs import requiredModels


class SetupFlow:
    """ui: an object with confirm(text) -> bool, inform(text), status(text), progress(percent or None, text),
    jobStarted(job) and jobEnded() (the panel's dialogs, labels and timer)."""

    def __init__(self, logic, ui, missingPackages=dependencies.missingPackages, install=dependencies.installInSlicer):
        self.logic = logic
        self.ui = ui
        self.missingPackages = missingPackages
        self.install = install
        self.job = None
        self.installing = False

    @property
    def isRunning(self):
        return self.installing or (self.job is not None and self.job.isRunning)

    def cancel(self):
        if self.job is not None:
            self.job.cancel()

    def ensure(self, then, models="", training=False, zeroShotModels=True):
        """Packages, then models; then() once everything is ready. Returns at once."""
        if self.installing:     # Apply or Start pressed again while pip runs (it pumps the event loop)
            self.ui.status(_("Python packages are being installed; wait until it ends."))
            return
        packages = dependencies.PYTHON_PACKAGES + (dependencies.TRAINING_PACKAGES if training else [])
        missing = self.missingPackages(packages)
        if missing and not self.installPackages(missing):
            return
        names = [n for n in (requiredModels(models) if zeroShotModels else [])
                 if n not in self.logic.verifiedModels]
        if not names:
            then()
            return
        self.ui.status(_("Checking models: {names}...").format(names=", ".join(names)))
        self._run("verify", names, lambda failed: self.offerDownload(failed, then) if failed else then())

    def installPackages(self, missing):
        names = dependencies.describeMissing(missing)
        if not self.ui.confirm(_("MedCLIP-SAM needs these Python packages, which are missing or too old:\n{names}\n\n"
                                 "Install them now? This downloads about 3 GB (PyTorch included) and may take several "
                                 "minutes.").format(names=names)):
            self.ui.status(_("Missing Python packages: {names}").format(names=names))
            return False
        self.ui.status(_("Installing {names}...").format(names=names))
        # slicer.util.pip_install pumps the event loop for every line pip prints (Base/Python/slicer/util.py:
        # 3944, v5.10.0): Apply stays clickable unless the panel greys it out now (isRunning is True)
        self.installing = True
        self._buttons()
        try:
            self.install(missing)
        finally:
            self.installing = False
            self._buttons()
        self.ui.status(_("Python packages installed."))
        return True

    def _buttons(self):
        update = getattr(self.ui, "updateButtons", None)
        if update is not None:
            update()

    def offerDownload(self, failed, then=None):
        """failed: [(name, message)]. Download after asking; otherwise say which file goes where."""
        details = "\n".join(f"{name}: {message}" for name, message in failed)
        if self.ui.confirm(_("These models are not in the model cache yet:\n{details}\n\nDownload them now? This "
                             "needs internet access.").format(details=details)):
            self._run("download", [name for name, _m in failed],
                      lambda bad: self.report(bad) if bad else (then() if then else self.ui.status(
                          _("Models downloaded."))))
            return
        self.ui.inform(_("Without internet access, copy the model files by hand:\n\n{details}\n\nThen press "
                         "'Register models placed by hand' in the Setup section (it runs the 'verify --adopt' "
                         "step for you).").format(details=details))

    def registerPlacedByHand(self, models=""):
        """`models verify --adopt`: record the checksums of model files copied into the cache by hand."""
        self._run("verify", requiredModels(models),
                  lambda bad: self.report(bad) if bad else self.ui.status(_("Models registered.")), "--adopt")

    def report(self, failed):
        self.ui.status("\n".join(f"{name}: {message}" for name, message in failed))

    def _run(self, action, names, whenDone, *extra):
        def completed(results):
            self.job = None
            self.ui.jobEnded()
            self.logic.verifiedModels.update(n for n, (ok, _m) in results.items() if ok)
            if len(results) < len(names):
                self.ui.status(_("Cancelled."))
                return
            whenDone([(n, m) for n, (ok, m) in results.items() if not ok])

        self.job = self.logic.startModelsJob(action, names, *extra, completedCallback=completed,
                                             progressCallback=lambda name, percent, line: self.ui.progress(
                                                 percent, f"{name}: {line[-120:]}"))
        self.ui.jobStarted(self.job)
