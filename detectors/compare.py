"""``python -m detectors.compare RUN_DIR... [--out DIR] [--evaluate] [--sort KEY]``: a table of training runs,
their validation curves and PR curves (``detectors.tasks.compare``)."""

if __name__ == "__main__":
    import sys

    from detectors.tasks.compare import main

    sys.exit(main())
