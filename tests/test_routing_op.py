"""Routing metadata: the C++ CPU op against the torch reference, the reference's own invariants, and the
CUDA source compiled with nvcc (no GPU here, so compilation is what can be checked)."""
import os
import shutil
import subprocess

import pytest
import torch

from megatron_jai.kernels.routing import routing_metadata_reference

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _extension():
    # The CPU op is always built by `pip install -e .` / scripts/setup_env.sh: missing is a failure.
    import megatron_jai.kernels._routing as ext

    return ext


def _random_ids(n, k, num_experts, skip_fraction, dtype, generator):
    ids = torch.randint(0, num_experts, (n, k), generator=generator)
    skipped = torch.rand((n, k), generator=generator) < skip_fraction
    # Skipped slots: -1 by convention, but any id outside [0, E) counts as skipped.
    outside = torch.where(torch.rand((n, k), generator=generator) < 0.8, -1, num_experts + 3)
    return torch.where(skipped, outside, ids).to(dtype)


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32])
@pytest.mark.parametrize("n,k,num_experts,skip", [
    (0, 2, 4, 0.0), (1, 1, 1, 0.0), (7, 2, 4, 0.3), (513, 2, 4, 0.1), (300, 6, 64, 0.2),
    (1000, 3, 5, 1.0), (4099, 2, 8, 0.0),
])
def test_cpu_op_matches_reference(dtype, n, k, num_experts, skip):
    ext = _extension()
    g = torch.Generator().manual_seed(n * 31 + k)
    ids = _random_ids(n, k, num_experts, skip, dtype, g)
    got = ext.routing_metadata_cpu(ids, num_experts)
    want = routing_metadata_reference(ids, num_experts)
    for name, a, b in zip(want._fields, got, want):
        assert a.dtype == torch.int64, name
        assert torch.equal(a, b), name


def test_python_entry_uses_extension(monkeypatch):
    from megatron_jai.kernels import routing

    assert routing.load_extension() is not None
    calls = []
    monkeypatch.setattr(routing, "routing_metadata_reference", lambda *a: calls.append(a))
    ids = torch.tensor([[2, 0], [-1, 2]])
    meta = routing.routing_metadata(ids, 3)
    assert not calls  # the compiled op answered, not the fallback
    assert meta.tokens_per_expert.tolist() == [1, 0, 2]
    assert meta.offsets.tolist() == [0, 1, 1, 3]
    assert meta.sorted_slots.tolist() == [1, 0, 3, 2]  # expert 0: slot 1; expert 2: slots 0, 3; skipped: 2
    assert meta.slot_positions.tolist() == [1, 0, 3, 2]


def test_reference_invariants():
    g = torch.Generator().manual_seed(0)
    ids = _random_ids(257, 3, 6, 0.25, torch.int64, g)
    meta = routing_metadata_reference(ids, 6)
    flat = ids.reshape(-1)
    routed = (flat >= 0) & (flat < 6)
    assert meta.offsets[-1].item() == routed.sum().item()
    assert torch.equal(meta.slot_positions[meta.sorted_slots], torch.arange(flat.numel()))
    for e in range(6):
        group = meta.sorted_slots[meta.offsets[e]:meta.offsets[e + 1]]
        assert torch.equal(group, torch.nonzero(flat == e).flatten())  # stable: ascending slots
        assert meta.tokens_per_expert[e].item() == group.numel()
    assert torch.equal(meta.sorted_slots[meta.offsets[-1]:], torch.nonzero(~routed).flatten())


def test_bad_arguments():
    ext = _extension()
    with pytest.raises(RuntimeError, match="num_experts"):
        ext.routing_metadata_cpu(torch.zeros(3, 2, dtype=torch.long), 0)
    with pytest.raises(RuntimeError, match="int32 or int64"):
        ext.routing_metadata_cpu(torch.zeros(3, 2), 4)


def _nvcc():
    cuda_home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH") or "/usr/local/cuda"
    candidate = os.path.join(cuda_home, "bin", "nvcc")
    return candidate if os.path.exists(candidate) else shutil.which("nvcc")


def test_cuda_source_compiles(tmp_path):
    nvcc = _nvcc()
    if nvcc is None:
        pytest.skip("nvcc not found (set CUDA_HOME): the CUDA routing kernels cannot be compiled here")
    obj = tmp_path / "routing_cuda.o"
    proc = subprocess.run([nvcc, "-O3", "-std=c++20", "-arch=sm_90", "-Werror", "all-warnings", "-c",
                           os.path.join(REPO, "kernels", "routing_cuda.cu"), "-o", str(obj)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    nm = shutil.which("nm")
    if nm:
        symbols = subprocess.run([nm, str(obj)], capture_output=True, text=True).stdout
        for name in ("jai_routing_metadata_cuda", "jai_routing_workspace_ints", "jai_routing_last_error"):
            assert f" T {name}" in symbols, name


def test_cuda_binding_compiles(tmp_path):
    """routing.cpp with JAI_WITH_CUDA (the torch binding of the CUDA launcher, built only on CUDA
    machines) type-checks against torch's headers and the CUDA runtime headers."""
    import sysconfig

    from torch.utils.cpp_extension import include_paths

    nvcc = _nvcc()
    compiler = shutil.which("c++") or shutil.which("g++")
    if nvcc is None or compiler is None:
        pytest.skip("nvcc or a C++ compiler not found: the CUDA binding cannot be compiled here")
    cuda_include = os.path.join(os.path.dirname(os.path.dirname(os.path.realpath(nvcc))), "include")
    if not os.path.exists(os.path.join(cuda_include, "cuda_runtime_api.h")):
        cuda_include = "/usr/local/cuda/include"
    headers = include_paths()
    if not any(os.path.exists(os.path.join(d, "c10", "cuda", "CUDAGuard.h")) for d in headers):
        pytest.skip("this torch ships no c10/cuda headers")
    # CPU torch wheels lack this one generated header of the CUDA build: provide it.
    macros = tmp_path / "c10" / "cuda" / "impl" / "cuda_cmake_macros.h"
    if not any(os.path.exists(os.path.join(d, "c10", "cuda", "impl", "cuda_cmake_macros.h")) for d in headers):
        macros.parent.mkdir(parents=True)
        macros.write_text("#pragma once\n#define C10_CUDA_BUILD_SHARED_LIBS\n")
    cmd = [compiler, "-std=c++20", "-fsyntax-only", "-Wall", "-Wextra", "-Werror", "-DJAI_WITH_CUDA",
           "-DTORCH_EXTENSION_NAME=_routing", "-DTORCH_API_INCLUDE_EXTENSION_H", f"-I{tmp_path}",
           f"-I{sysconfig.get_paths()['include']}", f"-I{cuda_include}"]
    cmd += [f"-isystem{d}" for d in headers]
    proc = subprocess.run(cmd + [os.path.join(REPO, "kernels", "routing.cpp")], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
