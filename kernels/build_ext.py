"""Extension modules built from kernels/ (setup.py execs this file and calls ``extensions(root)``).

``megatron_jai.kernels._routing``: the routing-metadata op. Always built with the C++ CPU
implementation (``routing.cpp``); when torch was built with CUDA and a CUDA toolkit is found
(``CUDA_HOME``), ``routing_cuda.cu`` is compiled in as well (nvcc) and ``JAI_WITH_CUDA`` binds it.
Set ``JAI_BUILD_CUDA=0`` to build the CPU op only on a CUDA machine.
"""
import os


def cuda_build_enabled() -> bool:
    import torch
    from torch.utils.cpp_extension import CUDA_HOME

    if os.environ.get("JAI_BUILD_CUDA", "1") == "0":
        return False
    return bool(torch.version.cuda) and CUDA_HOME is not None and os.path.isdir(CUDA_HOME)


def extensions(root):
    """``(ext_modules, cmdclass)`` for setuptools; paths are relative to the project ``root``."""
    try:
        from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension
    except ImportError as exc:  # pip's build isolation hides the installed torch
        raise SystemExit("megatron-jai compiles its routing op against the installed torch: install torch "
                         "first and use `pip install --no-build-isolation -e .`") from exc

    def rel(name):
        return os.path.relpath(os.path.join(root, "kernels", name), os.getcwd())

    cxx_flags = ["-O3"]  # the C++ standard is the one torch's BuildExtension picks for its headers
    if cuda_build_enabled():
        import torch

        if not os.environ.get("TORCH_CUDA_ARCH_LIST") and torch.cuda.device_count() == 0:
            # torch derives the archs from the visible GPUs and fails (IndexError) when there is
            # none (a login node, `docker build`): target A100/H100 then. routing_cuda.cu needs
            # sm_70+ (__match_any_sync); set TORCH_CUDA_ARCH_LIST for other cards.
            os.environ["TORCH_CUDA_ARCH_LIST"] = "8.0;9.0+PTX"
        ext = CUDAExtension(
            "megatron_jai.kernels._routing",
            [rel("routing.cpp"), rel("routing_cuda.cu")],
            define_macros=[("JAI_WITH_CUDA", None)],
            extra_compile_args={"cxx": cxx_flags, "nvcc": ["-O3", "-lineinfo"]},
        )
    else:
        ext = CppExtension("megatron_jai.kernels._routing", [rel("routing.cpp")],
                           extra_compile_args={"cxx": cxx_flags})
    return [ext], {"build_ext": BuildExtension}
