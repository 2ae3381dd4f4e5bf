"""The built-in synthetic demo: six virtual sites writing real DICOM from a seed (nothing to download).

``phantoms``   anatomical phantoms and modality renderers (pure numpy, no I/O)
``generator``  sites, storage quirks and DICOM writing; :class:`~modality.demo.generator.DemoSource` is the
               source ``configs/dataset/demo.yaml`` instantiates (docs/demo.md)

The demo stands outside :mod:`modality.sources` because it *makes* its inputs: prepare reads its files through
the same readers as any real pool.
"""
