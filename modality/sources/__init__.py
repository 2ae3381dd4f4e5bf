"""Sources list input files as :class:`modality.records.InputItem` records, one per file.

One module per kind of source (image folders, manifests, public datasets, IDC); each offers an object with
``items() -> list[InputItem]`` that a dataset pool config instantiates. The built-in demo, which writes its
own DICOM first, is :mod:`modality.demo`.
"""
