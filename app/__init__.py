"""Front ends (imported as ``diffattn.app``): the ``diffattn`` command line (``app/cli.py``)."""
