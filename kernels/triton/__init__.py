"""Triton pieces shared by the kernels: the element-rule switch (``rules.py``)."""
