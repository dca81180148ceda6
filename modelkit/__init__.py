"""Facts shared by the detector, the model and the service, each named once. Imports no torch at package level,
so the web tier can read them without loading the models' dependencies."""
