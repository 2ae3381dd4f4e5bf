"""``python -m`` entry points that drive a stage from outside it (Hydra apps; the work is in the stage).

``idc_catalog``   what IDC offers per collection and class (:mod:`modality.sources.idc.catalog`)
``idc_plan``      whole IDC collections to train / val / test (:mod:`modality.sources.idc.plan`)
``idc_download``  fetch a plan's series with s5cmd (:mod:`modality.sources.idc.download`)

Elsewhere: ``python -m modality.prepare`` and ``python -m modality.crossval`` (still flat in ``modality/``),
``python -m modality.reports`` (the report package's own command), ``python -m modality.audit``,
``train.py`` and ``eval.py`` at the root.
"""
