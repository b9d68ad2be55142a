"""``python -m detectors.compare RUN_DIR... [--out DIR] [--evaluate] [--sort KEY]``: a table of training runs,
their validation curves and PR curves. The command lives in ``detectors.tasks.compare``; this package only
holds its ``__main__``."""
