"""What a trained checkpoint says, behind ``eval.py``: one module per job.

``checkpoint``    a checkpoint or run folder -> the model, its ``data_info``, its stored preprocessing and
                  label maps, the fusion calibration fitted beside it
``shard_split``   test-shard evaluation (``eval.py ckpt_path=...``): metrics.json, confusion matrices,
                  predictions.csv; the fusion fitted on held-out splits (``calibrate_on_splits``)
``timing``        forward-pass timing and the hardware it ran on
``predict``       raw-file prediction (``eval.py ... input=<file or folder>``): predictions.csv,
                  series_votes.csv, unreadable.csv, prediction_summary.json
``given_labels``  ``labels=`` (a CSV, ``folder`` or ``header``) matched to the input files
``mislabels``     the mislabel report: series whose given label disagrees with the pixels, ranked; its page
``writers``       whole-or-nothing CSV and text writers, the output folder
"""
