"""Native CPU kernels that XLA calls through its FFI, compiled on first use.

`sdl.kernels.gemm`: fp32 GEMMs on CPU through a BLAS library's `cblas_sgemm` (NumPy's
OpenBLAS by default; a vendor BLAS such as Fujitsu's or Arm's on an A64FX node).
`sdl.kernels.build` compiles the C++ sources next to it with the machine's C++ compiler
and jaxlib's FFI headers, into a per-user cache.
"""
