"""Attention kernels (imported as ``diffattn.kernels``): Triton block-sparse flash attention
forward and backward, a FlexAttention backend, a masked-SDPA backend, the LSE merge and the fp32
reference twin."""

if __name__ == "kernels":  # this folder imported as a top-level package: it shadows Hugging Face's
    # ``kernels`` (a dependency of transformers >= 5.25, imported by diffusers through peft)
    raise ImportError(
        "imported diffattn's source folder kernels/ as the top-level package 'kernels', shadowing "
        "Hugging Face's 'kernels' package: the checkout's root is on sys.path (python -m run from the "
        "repository root). Run from another directory, or use 'pytest' rather than 'python -m pytest'; "
        "this folder imports as diffattn.kernels."
    )

# the 8-bit forward modes of the block-sparse kernel (kernels/triton/quant.py); None = the inputs' dtype.
# "int8" / "fp8": Q.K^T in int8 / e4m3 and P.V in e4m3; "int8-qk": int8 Q.K^T, P.V in the inputs' dtype.
# Here, not in quant.py, so that code without triton can name them.
PRECISIONS = ("int8", "fp8", "int8-qk")
