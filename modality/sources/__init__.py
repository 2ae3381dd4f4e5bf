"""Sources list input files as :class:`modality.records.InputItem` records, one per file.

One module per kind of source (the built-in demo, image folders, manifests, public datasets, IDC); each
offers an object with ``items() -> list[InputItem]`` that a dataset pool config instantiates.
"""
