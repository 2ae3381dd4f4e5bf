"""modality: pool public medical-imaging collections and learn a scan's modality and body part from its pixels.

Data flow, one sub-package per stage:
sources -> readers -> labels/intensity -> shards -> data (DataModule) -> models -> metrics -> reports.
"""

__version__ = "0.1.0"
