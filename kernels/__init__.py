"""megatron-jai kernels (installed as ``megatron_jai.kernels``; sources live in the repo's ``kernels/``).

Self-contained: nothing here imports the rest of ``megatron_jai``. Each kernel file holds the kernel,
its launch wrapper, its autograd Function (where it has a gradient) and its plain-torch reference
(``README.md`` lists them with their tests and benchmark rows):

* ``routing`` -- routing metadata op and its conventions: C++ (CPU, always built) and CUDA (built when
  torch has CUDA), bound with pybind11 in ``routing.cpp``; the plain CUDA kernels are in
  ``routing_cuda.cu``.
* ``moe_grouped_gemm`` -- Triton grouped-GEMM expert FFN (forward and backward) and its autograd
  Function ``GroupedExpertFFN``; ``moe_combine`` -- the deterministic per-token sum of the k expert outputs.
* ``triton_aot`` -- every Triton launch goes through it, so launches can be recorded and compiled for
  a GPU architecture without a GPU, specialised exactly as at run time (``tools/compile_kernels.py``).

Modules are imported on demand: nothing here imports Triton or the compiled extension eagerly.
"""
