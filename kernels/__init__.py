"""Attention kernels (imported as ``diffattn.kernels``): Triton block-sparse flash attention
forward and backward, a FlexAttention backend, a masked-SDPA backend, the LSE merge and the fp32
reference twin."""
