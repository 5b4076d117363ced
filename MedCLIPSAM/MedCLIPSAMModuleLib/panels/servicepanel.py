"""The "Service" group of "Setup and advanced", built in code: where everything the panel runs goes (a
local service or a remote one), the remote URL and token, "Test connection", and a state line.

The settings live in the user's settings (QSettings), not in the parameter node: they describe this
computer, not a scene, and the token must never be saved into a .mrml scene file (those are shared). The
token is kept in QSettings rather than asked for in every Slicer session: it already sits in a file in the
user's home on the service's machine, and the scene file is the copy that travels.

Anything that may wait on the network (test connection, the state line's /info) runs on a thread; a
QTimer brings the one-line answer back to the panel. qt is imported where used.
"""

import threading

from ..i18n import tr as _
from ..servicebackend import MODES

SETTINGS_KEYS = {"mode": "MedCLIPSAM/serviceMode", "url": "MedCLIPSAM/serviceUrl", "token": "MedCLIPSAM/serviceToken"}


def loadSettings(value):
    """(mode, url, token) from the user's settings; value(key, default) reads one."""
    mode = str(value(SETTINGS_KEYS["mode"], "local") or "local")
    return (mode if mode in MODES else "local", str(value(SETTINGS_KEYS["url"], "") or ""),
            str(value(SETTINGS_KEYS["token"], "") or ""))


class ServicePanel:
    def __init__(self, backend, formLayout):
        import qt

        self.backend = backend
        self.box = qt.QGroupBox(_("Service"))
        form = qt.QFormLayout(self.box)
        self.modeCombo = qt.QComboBox()
        for value, label in (("local", _("a local service (started by Slicer, kept warm)")),
                             ("remote", _("a remote service (e.g. a GPU machine)"))):
            self.modeCombo.addItem(label, value)
        self.modeCombo.toolTip = _("Segmentation, trained models, click refinement and training all run here.")
        self.urlEdit = qt.QLineEdit()
        self.urlEdit.placeholderText = "https://gpu-box:8765"
        self.urlEdit.toolTip = _("The URL 'medclipsam serve --host ...' listens on")
        self.tokenEdit = qt.QLineEdit()
        self.tokenEdit.setEchoMode(qt.QLineEdit.Password)
        self.tokenEdit.toolTip = _("The contents of the service's --token-file (kept in your Slicer settings, "
                                   "never in a scene file)")
        self.testButton = qt.QPushButton(_("Test connection"))
        self.testLabel = qt.QLabel()
        self.testLabel.wordWrap = True
        self.stateLabel = qt.QLabel()
        self.stateLabel.wordWrap = True
        form.addRow(_("Segmentation runs in:"), self.modeCombo)
        form.addRow(_("Remote URL:"), self.urlEdit)
        form.addRow(_("Token:"), self.tokenEdit)
        form.addRow(self.testButton, self.testLabel)
        form.addRow(_("State:"), self.stateLabel)
        formLayout.addRow(self.box)

        settings = qt.QSettings()
        mode, url, token = loadSettings(lambda key, default: settings.value(key, default))
        self.urlEdit.text, self.tokenEdit.text = url, token
        self.modeCombo.currentIndex = max(0, self.modeCombo.findData(mode))
        self._threads = []   # (thread, holder, done) whose answer the timer collects
        self._timer = qt.QTimer()
        self._timer.setInterval(200)
        self._timer.connect("timeout()", self._collect)
        self.modeCombo.connect("currentIndexChanged(int)", self.onChanged)
        self.urlEdit.connect("editingFinished()", self.onChanged)
        self.tokenEdit.connect("editingFinished()", self.onChanged)
        self.testButton.connect("clicked(bool)", self.onTest)
        self.onChanged()

    def onChanged(self, *_args):
        import qt

        mode = self.modeCombo.itemData(self.modeCombo.currentIndex) or "local"
        self.urlEdit.enabled = self.tokenEdit.enabled = mode == "remote"
        self.backend.configure(mode, self.urlEdit.text, self.tokenEdit.text)
        settings = qt.QSettings()
        for name, value in (("mode", mode), ("url", self.urlEdit.text), ("token", self.tokenEdit.text)):
            settings.setValue(SETTINGS_KEYS[name], value)
        self.testLabel.text = ""
        self.refresh()

    def onTest(self, *_args):
        self.onChanged()
        self.testButton.enabled = False
        self.testLabel.text = _("Testing...")

        def done(answer):
            ok, sentence = answer
            self.testLabel.text = sentence
            self.testLabel.setStyleSheet("" if ok else "color: #c05000")
            self.testButton.enabled = True
        self._inBackground(self.backend.testConnection, done)

    def refresh(self):
        """Update the state line (after a run, a settings change or a test)."""
        def done(text):
            self.stateLabel.text = text
        self._inBackground(self.backend.describe, done)

    def _inBackground(self, call, done):
        holder = {}

        def run():
            try:
                holder["answer"] = call()
            except Exception as exc:  # shown, not raised: the panel must not break
                holder["answer"] = (False, str(exc)) if call == self.backend.testConnection else str(exc)
        thread = threading.Thread(target=run, name="medclipsam-service-panel", daemon=True)
        thread.start()
        self._threads.append((thread, holder, done))
        self._timer.start()

    def _collect(self):
        for entry in list(self._threads):
            thread, holder, done = entry
            if not thread.is_alive():
                self._threads.remove(entry)
                done(holder.get("answer"))
        if not self._threads:
            self._timer.stop()
