"""3D Slicer front end: `logic` (MRML nodes <-> the application's jobs, no Qt) and the scripted module Slicer loads
(``slicer_module/CTColor.py``)."""
