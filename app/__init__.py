"""Front ends (imported as ``diffattn.app``): the ``diffattn`` command line (``app/cli.py``), the
block-map tool (``app/mask.py``) and the Gradio demo (``app/demo.py``, the ``[app]`` extra)."""
