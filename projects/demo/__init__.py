"""The demo: ``main_job.py`` (``make demo``) and ``demo.py`` (drawings of predictions)."""
