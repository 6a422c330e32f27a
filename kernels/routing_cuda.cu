// Routing metadata on the GPU, without a host synchronisation: plain CUDA (no torch headers, so it
// compiles in seconds); the torch binding is in routing.cpp, which calls the extern "C" launcher.
//
// Slots s = n*k + j are keyed by expert id (ids outside [0, E) -> bucket E, sorted last) and
// stable-sorted by a three-kernel counting sort over blocks of kSlotsPerBlock slots:
//   1. block_histogram: per-block bucket counts, stored bucket-major [E+1][num_blocks];
//   2. scan_bases (one block): exclusive scan of those counts = the first sorted position of each
//      (bucket, block); also tokens_per_expert and offsets;
//   3. stable_scatter: each block walks its slots in order, 256 at a time; a slot's rank among equal
//      keys comes from __match_any_sync within its warp plus per-warp counts in shared memory.
// Convention: routing.py. Requires sm_70+ (__match_any_sync).
#include <cuda_runtime.h>
#include <stdint.h>
#include <stdio.h>

namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int kSlotsPerBlock = 2048;
constexpr int kScanThreads = 1024;
constexpr size_t kMaxSharedBytes = 48 * 1024;

thread_local char g_last_error[256] = "";

template <typename T>
__device__ __forceinline__ int slot_key(const T* ids, int64_t s, int num_experts) {
  const int64_t id = static_cast<int64_t>(ids[s]);
  return (id >= 0 && id < num_experts) ? static_cast<int>(id) : num_experts;
}

template <typename T>
__global__ void block_histogram(const T* __restrict__ ids, int64_t num_slots, int num_experts,
                                int num_blocks, int32_t* __restrict__ block_counts) {
  extern __shared__ int32_t hist[];  // [E + 1]
  const int buckets = num_experts + 1;
  for (int e = threadIdx.x; e < buckets; e += blockDim.x) hist[e] = 0;
  __syncthreads();
  const int64_t lo = static_cast<int64_t>(blockIdx.x) * kSlotsPerBlock;
  const int64_t hi = min(num_slots, lo + kSlotsPerBlock);
  for (int64_t s = lo + threadIdx.x; s < hi; s += blockDim.x) atomicAdd(&hist[slot_key(ids, s, num_experts)], 1);
  __syncthreads();
  for (int e = threadIdx.x; e < buckets; e += blockDim.x)
    block_counts[static_cast<int64_t>(e) * num_blocks + blockIdx.x] = hist[e];
}

__global__ void scan_bases(const int32_t* __restrict__ block_counts, int num_experts, int num_blocks,
                           int32_t* __restrict__ block_bases, int64_t* __restrict__ tokens_per_expert,
                           int64_t* __restrict__ offsets) {
  __shared__ int32_t partial[kScanThreads];
  const int64_t length = static_cast<int64_t>(num_experts + 1) * num_blocks;
  const int64_t per_thread = (length + kScanThreads - 1) / kScanThreads;
  const int64_t lo = min(length, threadIdx.x * per_thread);
  const int64_t hi = min(length, lo + per_thread);
  int32_t sum = 0;
  for (int64_t i = lo; i < hi; ++i) sum += block_counts[i];
  partial[threadIdx.x] = sum;
  __syncthreads();
  for (int stride = 1; stride < kScanThreads; stride <<= 1) {  // inclusive Hillis-Steele scan
    const int32_t add = threadIdx.x >= stride ? partial[threadIdx.x - stride] : 0;
    __syncthreads();
    partial[threadIdx.x] += add;
    __syncthreads();
  }
  int32_t running = partial[threadIdx.x] - sum;
  for (int64_t i = lo; i < hi; ++i) {
    block_bases[i] = running;
    running += block_counts[i];
  }
  __syncthreads();  // block_bases (global) written above are visible to the whole block after this
  for (int e = threadIdx.x; e <= num_experts; e += blockDim.x) {
    const int32_t start = block_bases[static_cast<int64_t>(e) * num_blocks];
    offsets[e] = start;
    if (e < num_experts) tokens_per_expert[e] = block_bases[static_cast<int64_t>(e + 1) * num_blocks] - start;
  }
}

template <typename T>
__global__ void stable_scatter(const T* __restrict__ ids, int64_t num_slots, int num_experts, int num_blocks,
                               const int32_t* __restrict__ block_bases, int64_t* __restrict__ sorted_slots,
                               int64_t* __restrict__ slot_positions) {
  extern __shared__ int32_t smem[];
  const int buckets = num_experts + 1;
  int32_t* running = smem;               // [E + 1]: next free sorted position of each bucket
  int32_t* warp_counts = smem + buckets;  // [kWarps][E + 1]: slots of each bucket per warp, this round
  for (int e = threadIdx.x; e < buckets; e += kThreads)
    running[e] = block_bases[static_cast<int64_t>(e) * num_blocks + blockIdx.x];
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  const unsigned lanes_below = (1u << lane) - 1u;
  const int64_t lo = static_cast<int64_t>(blockIdx.x) * kSlotsPerBlock;
  const int64_t hi = min(num_slots, lo + kSlotsPerBlock);
  for (int64_t base = lo; base < hi; base += kThreads) {  // same trip count for the whole block
    for (int i = threadIdx.x; i < kWarps * buckets; i += kThreads) warp_counts[i] = 0;
    __syncthreads();
    const int64_t s = base + threadIdx.x;
    const bool valid = s < hi;
    const int key = valid ? slot_key(ids, s, num_experts) : -1;
    const unsigned peers = __match_any_sync(0xffffffffu, key);
    const int rank = __popc(peers & lanes_below);  // earlier lanes of this warp with the same key
    if (valid && rank == 0) warp_counts[warp * buckets + key] = __popc(peers);
    __syncthreads();
    if (valid) {
      int32_t pos = running[key] + rank;
      for (int w = 0; w < warp; ++w) pos += warp_counts[w * buckets + key];
      sorted_slots[pos] = s;
      slot_positions[s] = pos;
    }
    __syncthreads();
    for (int e = threadIdx.x; e < buckets; e += kThreads) {
      int32_t total = 0;
      for (int w = 0; w < kWarps; ++w) total += warp_counts[w * buckets + e];
      running[e] += total;
    }
    __syncthreads();
  }
}

int fail(const char* what, cudaError_t err) {
  snprintf(g_last_error, sizeof(g_last_error), "%s: %s", what,
           err == cudaSuccess ? "invalid argument" : cudaGetErrorString(err));
  return 1;
}

template <typename T>
int launch(const T* ids, int64_t num_slots, int num_experts, int64_t* tokens_per_expert,
           int64_t* sorted_slots, int64_t* slot_positions, int64_t* offsets, int32_t* workspace,
           cudaStream_t stream) {
  const int num_blocks = static_cast<int>((num_slots + kSlotsPerBlock - 1) / kSlotsPerBlock);
  const int buckets = num_experts + 1;
  int32_t* block_counts = workspace;
  int32_t* block_bases = workspace + static_cast<int64_t>(num_blocks) * buckets;
  block_histogram<T><<<num_blocks, kThreads, buckets * sizeof(int32_t), stream>>>(
      ids, num_slots, num_experts, num_blocks, block_counts);
  scan_bases<<<1, kScanThreads, 0, stream>>>(block_counts, num_experts, num_blocks, block_bases,
                                              tokens_per_expert, offsets);
  stable_scatter<T><<<num_blocks, kThreads, (kWarps + 1) * buckets * sizeof(int32_t), stream>>>(
      ids, num_slots, num_experts, num_blocks, block_bases, sorted_slots, slot_positions);
  const cudaError_t err = cudaGetLastError();
  return err == cudaSuccess ? 0 : fail("routing kernels failed to launch", err);
}

}  // namespace

extern "C" const char* jai_routing_last_error() { return g_last_error; }

// int32 elements of workspace jai_routing_metadata_cuda needs.
extern "C" int64_t jai_routing_workspace_ints(int64_t num_slots, int64_t num_experts) {
  const int64_t num_blocks = (num_slots + kSlotsPerBlock - 1) / kSlotsPerBlock;
  return 2 * num_blocks * (num_experts + 1);
}

// Outputs are int64 device arrays: tokens_per_expert [E], sorted_slots [S], slot_positions [S],
// offsets [E+1]. Everything is enqueued on `stream`; returns 0, or 1 with jai_routing_last_error().
extern "C" int jai_routing_metadata_cuda(const void* expert_ids, int ids_are_int64, int64_t num_slots,
                                         int64_t num_experts, int64_t* tokens_per_expert,
                                         int64_t* sorted_slots, int64_t* slot_positions, int64_t* offsets,
                                         int32_t* workspace, void* stream_ptr) {
  cudaStream_t stream = static_cast<cudaStream_t>(stream_ptr);
  if (num_experts < 1 || num_slots < 0 || num_slots >= INT32_MAX)
    return fail("routing_metadata_cuda: need num_experts >= 1 and 0 <= num_slots < 2^31", cudaSuccess);
  if ((kWarps + 1) * (num_experts + 1) * sizeof(int32_t) > kMaxSharedBytes)
    return fail("routing_metadata_cuda: too many experts for shared memory (at most 1364)", cudaSuccess);
  if (num_slots == 0) {
    cudaError_t err = cudaMemsetAsync(tokens_per_expert, 0, num_experts * sizeof(int64_t), stream);
    if (err == cudaSuccess) err = cudaMemsetAsync(offsets, 0, (num_experts + 1) * sizeof(int64_t), stream);
    return err == cudaSuccess ? 0 : fail("routing_metadata_cuda: memset", err);
  }
  const int e = static_cast<int>(num_experts);
  if (ids_are_int64)
    return launch(static_cast<const int64_t*>(expert_ids), num_slots, e, tokens_per_expert, sorted_slots,
                  slot_positions, offsets, workspace, stream);
  return launch(static_cast<const int32_t*>(expert_ids), num_slots, e, tokens_per_expert, sorted_slots,
                slot_positions, offsets, workspace, stream);
}
