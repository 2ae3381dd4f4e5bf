"""``python -m`` entry points that drive a stage from outside it (Hydra apps; the work is in the stage).

``idc_catalog``   what IDC offers per collection and class (:mod:`modality.sources.idc.catalog`)
``idc_plan``      whole IDC collections to train / val / test (:mod:`modality.sources.idc.plan`)
``idc_download``  fetch a plan's series with s5cmd (:mod:`modality.sources.idc.download`)
``audit``         leakage audit of stored shards: patients, series, identical and near-identical images
                  across splits (reads shards through :mod:`modality.shards`; its hashing lives here too)

Elsewhere: ``python -m modality.prepare`` and ``python -m modality.crossval`` (still flat in ``modality/``),
``python -m modality.reports`` (the report package's own command, :mod:`modality.reports.cli`), ``train.py``
and ``eval.py`` at the root. Options of each: ``configs/<name>.yaml`` (``catalog``, ``plan``, ``download``,
``audit``, ``report``, ``prepare``, ``crossval``, ``train``, ``eval``).
"""
