"""Triton pieces shared by the kernels: the element-rule switch (``rules.py``), per-block rule bits
(``bits.py``), 8-bit operands (``quant.py``) and the on-disk autotune cache (``tuning.py``)."""
