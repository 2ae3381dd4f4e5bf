"""Training orchestration: the job behind ``train.py``, its callbacks, run summaries and multirun isolation."""
