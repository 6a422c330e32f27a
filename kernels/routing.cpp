// Routing metadata op: from top-k expert ids [N, k] compute tokens per expert, the stable sort of the
// N*k slots by expert (skipped slots -- ids outside [0, E) -- last), its inverse, and group offsets.
// Convention documented in routing.py (beside its torch reference). CPU implementation here (a two-pass
// counting sort); with JAI_WITH_CUDA the CUDA launcher from routing_cuda.cu is bound as well.
#include <torch/extension.h>

#include <vector>

#ifdef JAI_WITH_CUDA
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>

extern "C" int jai_routing_metadata_cuda(const void* expert_ids, int ids_are_int64, int64_t num_slots,
                                         int64_t num_experts, int64_t* tokens_per_expert,
                                         int64_t* sorted_slots, int64_t* slot_positions,
                                         int64_t* offsets, int32_t* workspace, void* stream);
extern "C" int64_t jai_routing_workspace_ints(int64_t num_slots, int64_t num_experts);
extern "C" const char* jai_routing_last_error();
#endif

namespace {

void check_inputs(const torch::Tensor& expert_ids, int64_t num_experts) {
  TORCH_CHECK(num_experts >= 1, "num_experts must be >= 1, got ", num_experts);
  TORCH_CHECK(expert_ids.scalar_type() == torch::kLong || expert_ids.scalar_type() == torch::kInt,
              "expert_ids must be int32 or int64, got ", expert_ids.scalar_type());
}

template <typename T>
void counting_sort(const T* ids, int64_t num_slots, int64_t num_experts, int64_t* tokens_per_expert,
                   int64_t* sorted_slots, int64_t* slot_positions, int64_t* offsets) {
  // Bucket E collects the skipped slots, so the result is a full permutation.
  std::vector<int64_t> next(num_experts + 1, 0);
  auto key = [num_experts](int64_t id) { return (id >= 0 && id < num_experts) ? id : num_experts; };
  for (int64_t s = 0; s < num_slots; ++s) next[key(static_cast<int64_t>(ids[s]))] += 1;
  int64_t running = 0;
  for (int64_t e = 0; e <= num_experts; ++e) {
    if (e < num_experts) tokens_per_expert[e] = next[e];
    offsets[e] = running;
    const int64_t count = next[e];
    next[e] = running;
    running += count;
  }
  for (int64_t s = 0; s < num_slots; ++s) {
    const int64_t pos = next[key(static_cast<int64_t>(ids[s]))]++;
    sorted_slots[pos] = s;
    slot_positions[s] = pos;
  }
}

std::vector<torch::Tensor> routing_metadata_cpu(const torch::Tensor& expert_ids, int64_t num_experts) {
  check_inputs(expert_ids, num_experts);
  TORCH_CHECK(expert_ids.device().is_cpu(), "routing_metadata_cpu expects a CPU tensor");
  const auto ids = expert_ids.contiguous();
  const int64_t num_slots = ids.numel();
  const auto opts = torch::TensorOptions().dtype(torch::kLong);
  auto tokens_per_expert = torch::empty({num_experts}, opts);
  auto sorted_slots = torch::empty({num_slots}, opts);
  auto slot_positions = torch::empty({num_slots}, opts);
  auto offsets = torch::empty({num_experts + 1}, opts);
  if (ids.scalar_type() == torch::kLong) {
    counting_sort(ids.data_ptr<int64_t>(), num_slots, num_experts, tokens_per_expert.data_ptr<int64_t>(),
                  sorted_slots.data_ptr<int64_t>(), slot_positions.data_ptr<int64_t>(),
                  offsets.data_ptr<int64_t>());
  } else {
    counting_sort(ids.data_ptr<int32_t>(), num_slots, num_experts, tokens_per_expert.data_ptr<int64_t>(),
                  sorted_slots.data_ptr<int64_t>(), slot_positions.data_ptr<int64_t>(),
                  offsets.data_ptr<int64_t>());
  }
  return {tokens_per_expert, sorted_slots, slot_positions, offsets};
}

#ifdef JAI_WITH_CUDA
std::vector<torch::Tensor> routing_metadata_cuda(const torch::Tensor& expert_ids, int64_t num_experts) {
  check_inputs(expert_ids, num_experts);
  TORCH_CHECK(expert_ids.is_cuda(), "routing_metadata_cuda expects a CUDA tensor");
  const c10::cuda::CUDAGuard guard(expert_ids.device());
  const auto ids = expert_ids.contiguous();
  const int64_t num_slots = ids.numel();
  const auto opts = torch::TensorOptions().dtype(torch::kLong).device(ids.device());
  auto tokens_per_expert = torch::empty({num_experts}, opts);
  auto sorted_slots = torch::empty({num_slots}, opts);
  auto slot_positions = torch::empty({num_slots}, opts);
  auto offsets = torch::empty({num_experts + 1}, opts);
  // Workspace through the caching allocator: no cudaMalloc, no host synchronisation.
  auto workspace = torch::empty({std::max<int64_t>(1, jai_routing_workspace_ints(num_slots, num_experts))},
                                opts.dtype(torch::kInt));
  const int rc = jai_routing_metadata_cuda(
      ids.data_ptr(), ids.scalar_type() == torch::kLong ? 1 : 0, num_slots, num_experts,
      tokens_per_expert.data_ptr<int64_t>(), sorted_slots.data_ptr<int64_t>(),
      slot_positions.data_ptr<int64_t>(), offsets.data_ptr<int64_t>(), workspace.data_ptr<int32_t>(),
      static_cast<void*>(c10::cuda::getCurrentCUDAStream().stream()));
  TORCH_CHECK(rc == 0, "routing_metadata_cuda failed: ", jai_routing_last_error());
  return {tokens_per_expert, sorted_slots, slot_positions, offsets};
}
#endif

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "megatron-jai routing metadata op (C++ CPU implementation; CUDA when built with it)";
  m.def("routing_metadata_cpu", &routing_metadata_cpu, pybind11::arg("expert_ids"),
        pybind11::arg("num_experts"),
        "(tokens_per_expert [E], sorted_slots [N*k], slot_positions [N*k], offsets [E+1]), int64");
#ifdef JAI_WITH_CUDA
  m.def("routing_metadata_cuda", &routing_metadata_cuda, pybind11::arg("expert_ids"),
        pybind11::arg("num_experts"), "CUDA version of routing_metadata_cpu (no host synchronisation)");
  m.attr("has_cuda") = true;
#else
  m.attr("has_cuda") = false;
#endif
}
