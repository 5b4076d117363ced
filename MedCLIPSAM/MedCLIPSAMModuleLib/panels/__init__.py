"""The panel's Qt sections (evidence, refine, service, training, trained models): each works on the
widget's `ui` and imports qt where it is used. Everything they run is in the Qt-free parent package."""
