"""diffattn's testbed (``diffattn_testbed``): procedural captioned data, small trained diffusers
pipelines, a judge, and tiny pipelines built in code for tests. A harness, not the product:
``import diffattn`` never needs it.

    from diffattn_testbed import load_pipeline
    pipe = load_pipeline("video")
"""

from .pipelines import DEFAULTS, KINDS, METHOD_OPTIONS, build_pipeline, load_pipeline

__all__ = ["DEFAULTS", "KINDS", "METHOD_OPTIONS", "build_pipeline", "load_pipeline"]
