"""tr(): Slicer's translation function inside Slicer, the text itself elsewhere (pytest, scripts)."""

try:
    from slicer.i18n import tr
except ImportError:  # slicer-core has no i18n module
    def tr(text):
        return text
