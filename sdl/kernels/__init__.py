"""Native CPU kernels that XLA calls through its FFI, compiled on first use.

`sdl.kernels.gemm`: fp32 GEMMs on CPU through a BLAS library's `cblas_sgemm` (NumPy's
OpenBLAS by default; a vendor BLAS such as Fujitsu's or Arm's on an A64FX node).
`sdl.kernels.conv3d`: a direct 3D convolution (forward and kernel gradient) for layers with
at most 4 input channels, such as CosmoFlow's and a 3D U-Net's first layer, which
`sdl.models.conv`'s CPU lowering takes (`use_direct` decides).
`sdl.kernels.checksum`: a chunk file's crc32c computed while it is read and copied, one
pass over the bytes (`sdl.data.store`'s checked reads; not an XLA kernel).
`sdl.kernels.brandes`: shortest-path dependencies from sampled sources (Brandes'
accumulation, threaded), `sdl.data.graphs`' estimated-betweenness feature (not an XLA
kernel).
`sdl.kernels.build` compiles the C++ sources next to it with the machine's C++ compiler
and jaxlib's FFI headers, into a per-user cache.
"""
