// The pybind11 module eplib._C. Tensors cross this boundary as raw addresses (tensor.data_ptr())
// plus sizes, so the native core never links against libtorch. The Python transports check
// dtypes, shapes and contiguity before calling in; the GIL is released while kernels run.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstdint>
#include <string>
#include <vector>

#include "cpu/kernels.h"
#include "eplib/errors.h"
#include "eplib/layout.h"
#include "cpu/parallel.h"
#include "cuda/peer.h"  // plain C++: the peer-buffer layout sizes are known without CUDA too
#ifdef EPLIB_WITH_CUDA
#include "cuda/kernels.h"
#include "cuda/peer_buffer.h"
#include "cuda/runtime.h"
#endif

namespace py = pybind11;

namespace {

template <typename T>
T* as_ptr(uintptr_t address) {
  return reinterpret_cast<T*>(address);
}

bool built_with_cuda() {
#ifdef EPLIB_WITH_CUDA
  return true;
#else
  return false;
#endif
}

int cuda_device_count() {
#ifdef EPLIB_WITH_CUDA
  return eplib::cuda::device_count();
#else
  return 0;
#endif
}

int cuda_runtime_version() {
#ifdef EPLIB_WITH_CUDA
  return eplib::cuda::runtime_version();
#else
  return 0;
#endif
}

#ifdef EPLIB_WITH_CUDA
// The view of a PeerBuffer for the row kernels, or nullptr (None: the nccl transport).
const eplib::cuda::PeerView* view_of(const eplib::cuda::PeerBuffer* peers) {
  return peers != nullptr ? peers->view() : nullptr;
}

// The CUDA kernels, named cuda_<CPU name>: the CPU function's arguments (dispatch_unpack and
// combine_pack have their own), then error_flag where the kernel checks values, then (row kernels)
// the peer transport's arguments, then the stream (torch.cuda.current_stream().cuda_stream). See
// cuda/kernels.h.
void def_cuda_kernels(py::module_& m) {
  using eplib::DType;
  namespace cuda = eplib::cuda;
  using cuda::PeerBuffer;
  const auto release_gil = py::call_guard<py::gil_scoped_release>();
  auto stream_of = [](uintptr_t stream) { return reinterpret_cast<cudaStream_t>(stream); };

  m.def(
      "cuda_set_device", &cuda::set_device, py::arg("device"),
      "Make `device` current in eplib's own (static) CUDA runtime: its launches use that device's context.");

  m.def(
      "cuda_dispatch_layout",
      [=](uintptr_t topk_idx, int64_t num_tokens, int num_topk, int num_experts, int num_ranks,
          uintptr_t num_tokens_per_rank, uintptr_t num_tokens_per_expert, uintptr_t is_token_in_rank,
          uintptr_t error_flag, uintptr_t stream) {
        cuda::dispatch_layout(as_ptr<const int64_t>(topk_idx), num_tokens, num_topk, num_experts, num_ranks,
                              as_ptr<int32_t>(num_tokens_per_rank), as_ptr<int32_t>(num_tokens_per_expert),
                              as_ptr<bool>(is_token_in_rank), as_ptr<int32_t>(error_flag), stream_of(stream));
      },
      release_gil);

  m.def(
      "cuda_send_positions",
      [=](uintptr_t is_token_in_rank, int64_t num_tokens, int num_ranks, uintptr_t send_pos,
          uintptr_t num_tokens_per_rank, int64_t slot_rows, uintptr_t error_flag, uintptr_t stream) {
        cuda::send_positions(as_ptr<const bool>(is_token_in_rank), num_tokens, num_ranks, as_ptr<int32_t>(send_pos),
                             as_ptr<int32_t>(num_tokens_per_rank), slot_rows, as_ptr<int32_t>(error_flag),
                             stream_of(stream));
      },
      release_gil);

  m.def(
      "cuda_dispatch_pack",
      [=](uintptr_t x, int64_t x_bytes, uintptr_t x_scales, int64_t scales_bytes, uintptr_t topk_idx,
          uintptr_t topk_weights, int num_topk, int num_experts, uintptr_t send_pos, int64_t num_tokens, int num_ranks,
          uintptr_t send_buffer, uintptr_t error_flag, const PeerBuffer* peers, uintptr_t rank_prefix_matrix,
          int64_t slot_rows, int max_blocks, uintptr_t stream) {
        cuda::dispatch_pack(as_ptr<const uint8_t>(x), x_bytes, as_ptr<const uint8_t>(x_scales), scales_bytes,
                            as_ptr<const int64_t>(topk_idx), as_ptr<const float>(topk_weights), num_topk, num_experts,
                            as_ptr<const int32_t>(send_pos), num_tokens, num_ranks, as_ptr<uint8_t>(send_buffer),
                            as_ptr<int32_t>(error_flag), view_of(peers), as_ptr<const int32_t>(rank_prefix_matrix),
                            slot_rows, max_blocks, stream_of(stream));
      },
      release_gil);

  m.def(
      "cuda_dispatch_unpack",
      [=](uintptr_t recv_buffer, uintptr_t recv_counts, int num_ranks, int64_t slot_rows, int64_t num_out_rows,
          int64_t x_bytes, int64_t scales_bytes, int num_topk, int num_local_experts, uintptr_t recv_x,
          uintptr_t recv_x_scales, uintptr_t recv_src_idx, uintptr_t recv_topk_idx, uintptr_t recv_topk_weights,
          uintptr_t num_recv_tokens_per_expert, uintptr_t num_recv_out, uintptr_t error_flag, const PeerBuffer* peers,
          int max_blocks, uintptr_t stream) {
        cuda::dispatch_unpack(as_ptr<const uint8_t>(recv_buffer), as_ptr<const int32_t>(recv_counts), num_ranks,
                              slot_rows, num_out_rows, x_bytes, scales_bytes, num_topk, num_local_experts,
                              as_ptr<uint8_t>(recv_x), as_ptr<uint8_t>(recv_x_scales), as_ptr<int32_t>(recv_src_idx),
                              as_ptr<int64_t>(recv_topk_idx), as_ptr<float>(recv_topk_weights),
                              as_ptr<int64_t>(num_recv_tokens_per_expert), as_ptr<int32_t>(num_recv_out),
                              as_ptr<int32_t>(error_flag), view_of(peers), max_blocks, stream_of(stream));
      },
      release_gil);

  m.def(
      "cuda_combine_pack",
      [=](uintptr_t x, int64_t x_bytes, uintptr_t topk_weights, int num_topk, uintptr_t recv_counts, int num_ranks,
          int64_t slot_rows, int64_t num_rows, uintptr_t send_buffer, const PeerBuffer* peers,
          uintptr_t rank_prefix_matrix, int max_blocks, uintptr_t stream) {
        cuda::combine_pack(as_ptr<const uint8_t>(x), x_bytes, as_ptr<const float>(topk_weights), num_topk,
                           as_ptr<const int32_t>(recv_counts), num_ranks, slot_rows, num_rows,
                           as_ptr<uint8_t>(send_buffer), view_of(peers), as_ptr<const int32_t>(rank_prefix_matrix),
                           max_blocks, stream_of(stream));
      },
      release_gil);

  m.def(
      "cuda_combine_reduce",
      [=](int dtype, uintptr_t recv_buffer, int64_t hidden, int num_topk, uintptr_t send_pos, int64_t num_tokens,
          int num_ranks, uintptr_t bias_0, uintptr_t bias_1, uintptr_t combined_x, uintptr_t combined_topk_weights,
          const PeerBuffer* peers, int max_blocks, uintptr_t stream) {
        cuda::combine_reduce(static_cast<DType>(dtype), as_ptr<const uint8_t>(recv_buffer), hidden, num_topk,
                             as_ptr<const int32_t>(send_pos), num_tokens, num_ranks, as_ptr<const void>(bias_0),
                             as_ptr<const void>(bias_1), as_ptr<void>(combined_x),
                             as_ptr<float>(combined_topk_weights), view_of(peers), max_blocks, stream_of(stream));
      },
      release_gil);

  m.def(
      "cuda_permute_layout",
      [=](uintptr_t topk_idx, int64_t num_rows, int num_topk, int num_local_experts, int64_t expert_alignment,
          int64_t num_out_rows, uintptr_t pair_pos, uintptr_t expert_offsets, uintptr_t num_tokens_per_expert,
          uintptr_t error_flag, uintptr_t stream) {
        cuda::permute_layout(as_ptr<const int64_t>(topk_idx), num_rows, num_topk, num_local_experts, expert_alignment,
                             num_out_rows, as_ptr<int32_t>(pair_pos), as_ptr<int64_t>(expert_offsets),
                             as_ptr<int64_t>(num_tokens_per_expert), as_ptr<int32_t>(error_flag), stream_of(stream));
      },
      release_gil);

  m.def(
      "cuda_permute_rows",
      [=](int dtype, uintptr_t x, int64_t num_rows, int64_t hidden, int num_topk, uintptr_t pair_pos,
          uintptr_t topk_weights, uintptr_t expert_offsets, uintptr_t num_tokens_per_expert, int num_local_experts,
          int64_t num_out_rows, uintptr_t out, uintptr_t stream) {
        cuda::permute_rows(static_cast<DType>(dtype), as_ptr<const void>(x), num_rows, hidden, num_topk,
                           as_ptr<const int32_t>(pair_pos), as_ptr<const void>(topk_weights),
                           as_ptr<const int64_t>(expert_offsets), as_ptr<const int64_t>(num_tokens_per_expert),
                           num_local_experts, num_out_rows, as_ptr<void>(out), stream_of(stream));
      },
      release_gil);

  m.def(
      "cuda_unpermute_rows",
      [=](int dtype, uintptr_t y, int64_t num_in_rows, int64_t hidden, int num_topk, uintptr_t pair_pos,
          uintptr_t topk_weights, int64_t num_rows, uintptr_t out, uintptr_t stream) {
        cuda::unpermute_rows(static_cast<DType>(dtype), as_ptr<const void>(y), num_in_rows, hidden, num_topk,
                             as_ptr<const int32_t>(pair_pos), as_ptr<const void>(topk_weights), num_rows,
                             as_ptr<void>(out), stream_of(stream));
      },
      release_gil);

  py::class_<PeerBuffer>(m, "PeerBuffer",
                         "One rank's CUDA IPC buffer (cuda/peer_buffer.h): export, import of the peers, notify "
                         "exchange, host-mapped status, teardown.")
      .def(py::init<int, int, int64_t, int>(), py::arg("rank"), py::arg("num_ranks"), py::arg("num_bytes"),
           py::arg("device"))
      .def("ipc_handle", [](const PeerBuffer& self) { return py::bytes(self.ipc_handle()); })
      .def(
          "open_peers",
          [](PeerBuffer& self, const std::vector<py::bytes>& handles) {
            std::vector<std::string> raw(handles.begin(), handles.end());
            self.open_peers(raw);
          },
          py::arg("handles"))
      .def("destroy", &PeerBuffer::destroy, py::arg("timeout_s"), release_gil)
      .def("close_peers", &PeerBuffer::close_peers)
      .def_property_readonly("is_open", &PeerBuffer::is_open)
      .def_property_readonly("num_bytes", &PeerBuffer::num_bytes)
      .def_property_readonly("region", &PeerBuffer::region)
      .def_property_readonly("region_bytes", &PeerBuffer::region_bytes)
      .def("set_timeout", &PeerBuffer::set_timeout, py::arg("seconds"))
      .def("timeout_report", &PeerBuffer::timeout_report)
      .def(
          "notify",
          [=](PeerBuffer& self, uintptr_t error_flag, const std::vector<int64_t>& fields, uintptr_t send_counts,
              uintptr_t num_tokens_per_expert, int num_experts, uintptr_t count_matrix, bool host_wait,
              uintptr_t stream) {
            cuda::NotifyFields packed{};
            if (fields.size() != std::size(packed.values))
              throw std::invalid_argument("eplib: notify takes " + std::to_string(std::size(packed.values)) +
                                          " format fields, got " + std::to_string(fields.size()));
            std::copy(fields.begin(), fields.end(), packed.values);
            self.notify(as_ptr<const int32_t>(error_flag), packed, as_ptr<const int32_t>(send_counts),
                        as_ptr<const int32_t>(num_tokens_per_expert), num_experts, as_ptr<int32_t>(count_matrix),
                        host_wait, stream_of(stream));
          },
          py::arg("error_flag"), py::arg("fields"), py::arg("send_counts"), py::arg("num_tokens_per_expert"),
          py::arg("num_experts"), py::arg("count_matrix"), py::arg("host_wait"), py::arg("stream"))
      .def("wait_notify", &PeerBuffer::wait_notify, py::arg("timeout_s"), release_gil);
}
#endif

}  // namespace

PYBIND11_MODULE(_C, m) {
  using eplib::DType;
  namespace cpu = eplib::cpu;
  const auto release_gil = py::call_guard<py::gil_scoped_release>();

  m.doc() = "eplib native core: CPU kernels and (when built with nvcc) CUDA kernels.";

  m.def("built_with_cuda", &built_with_cuda, "True when the CUDA part was compiled in.");
  m.def("cuda_device_count", &cuda_device_count, "Visible CUDA devices (0 without driver or GPU).");
  m.def("cuda_available", [] { return cuda_device_count() > 0; }, "True when CUDA kernels can run here.");
  m.def("cuda_runtime_version", &cuda_runtime_version, "CUDA runtime version compiled in (0 without CUDA).");
  // Bits the CUDA kernels set in a device error flag (eplib/errors.h); the host raises on them.
  m.attr("ERR_EXPERT_ID") = eplib::kErrorExpertId;
  m.attr("ERR_WEIGHT") = eplib::kErrorWeight;
  m.attr("ERR_OVERFLOW") = eplib::kErrorOverflow;
  // The peer (CUDA IPC) transport's fixed sizes (cuda/peer.h), known without CUDA for size hints.
  m.def("peer_header_bytes", [] { return eplib::cuda::kPeerRegionOffset; },
        "Bytes at the head of every peer buffer before its receive region.");
  m.attr("PEER_MAX_RANKS") = eplib::cuda::kMaxPeers;
  m.attr("PEER_MAX_LOCAL_EXPERTS") = eplib::cuda::kMaxPeerLocalExperts;
  m.attr("PEER_RECORD_FORMAT_FIELDS") = eplib::cuda::kRecordFormatFields;
  {
    namespace cuda = eplib::cuda;
    py::dict phases;
    phases[py::int_(static_cast<int>(cuda::kPhaseNotify))] = "dispatch (counts exchange)";
    phases[py::int_(static_cast<int>(cuda::kPhaseDispatchSend))] = "dispatch (send: waiting for a receiver to be ready)";
    phases[py::int_(static_cast<int>(cuda::kPhaseDispatchReceive))] = "dispatch (receive: waiting for a sender's rows)";
    phases[py::int_(static_cast<int>(cuda::kPhaseCombineSend))] = "combine (send: waiting for a receiver to be ready)";
    phases[py::int_(static_cast<int>(cuda::kPhaseCombineReceive))] = "combine (receive: waiting for a sender's rows)";
    phases[py::int_(static_cast<int>(cuda::kPhaseBarrier))] = "destroy (barrier)";
    m.attr("PEER_PHASES") = phases;
  }
  m.def("set_num_threads", &cpu::set_num_threads, py::arg("num_threads"));
  m.def("get_num_threads", &cpu::get_num_threads);

  m.def(
      "dispatch_layout",
      [](uintptr_t topk_idx, int64_t num_tokens, int num_topk, int num_experts, int num_ranks,
         uintptr_t num_tokens_per_rank, uintptr_t num_tokens_per_expert, uintptr_t is_token_in_rank) {
        cpu::dispatch_layout(as_ptr<const int64_t>(topk_idx), num_tokens, num_topk, num_experts, num_ranks,
                             as_ptr<int32_t>(num_tokens_per_rank), as_ptr<int32_t>(num_tokens_per_expert),
                             as_ptr<bool>(is_token_in_rank));
      },
      release_gil);

  m.def(
      "send_positions",
      [](uintptr_t is_token_in_rank, int64_t num_tokens, int num_ranks, uintptr_t send_pos,
         uintptr_t num_tokens_per_rank) {
        cpu::send_positions(as_ptr<const bool>(is_token_in_rank), num_tokens, num_ranks, as_ptr<int32_t>(send_pos),
                            as_ptr<int32_t>(num_tokens_per_rank));
      },
      release_gil);

  m.def(
      "dispatch_pack",
      [](uintptr_t x, int64_t x_bytes, uintptr_t x_scales, int64_t scales_bytes, uintptr_t topk_idx,
         uintptr_t topk_weights, int num_topk, int num_experts, uintptr_t send_pos, int64_t num_tokens, int num_ranks,
         uintptr_t send_buffer) {
        cpu::dispatch_pack(as_ptr<const uint8_t>(x), x_bytes, as_ptr<const uint8_t>(x_scales), scales_bytes,
                           as_ptr<const int64_t>(topk_idx), as_ptr<const float>(topk_weights), num_topk, num_experts,
                           as_ptr<const int32_t>(send_pos), num_tokens, num_ranks, as_ptr<uint8_t>(send_buffer));
      },
      release_gil);

  m.def(
      "dispatch_unpack",
      [](uintptr_t recv_buffer, int64_t num_rows, int64_t x_bytes, int64_t scales_bytes, int num_topk,
         int num_local_experts, uintptr_t recv_x, uintptr_t recv_x_scales, uintptr_t recv_src_idx,
         uintptr_t recv_topk_idx, uintptr_t recv_topk_weights, uintptr_t num_recv_tokens_per_expert) {
        cpu::dispatch_unpack(as_ptr<const uint8_t>(recv_buffer), num_rows, x_bytes, scales_bytes, num_topk,
                             num_local_experts, as_ptr<uint8_t>(recv_x), as_ptr<uint8_t>(recv_x_scales),
                             as_ptr<int32_t>(recv_src_idx), as_ptr<int64_t>(recv_topk_idx),
                             as_ptr<float>(recv_topk_weights), as_ptr<int64_t>(num_recv_tokens_per_expert));
      },
      release_gil);

  m.def(
      "combine_pack",
      [](uintptr_t x, int64_t x_bytes, uintptr_t topk_weights, int num_topk, int64_t num_rows, uintptr_t send_buffer) {
        cpu::combine_pack(as_ptr<const uint8_t>(x), x_bytes, as_ptr<const float>(topk_weights), num_topk, num_rows,
                          as_ptr<uint8_t>(send_buffer));
      },
      release_gil);

  m.def(
      "combine_reduce",
      [](int dtype, uintptr_t recv_buffer, int64_t hidden, int num_topk, uintptr_t send_pos, int64_t num_tokens,
         int num_ranks, uintptr_t bias_0, uintptr_t bias_1, uintptr_t combined_x, uintptr_t combined_topk_weights) {
        cpu::combine_reduce(static_cast<DType>(dtype), as_ptr<const uint8_t>(recv_buffer), hidden, num_topk,
                            as_ptr<const int32_t>(send_pos), num_tokens, num_ranks, as_ptr<const void>(bias_0),
                            as_ptr<const void>(bias_1), as_ptr<void>(combined_x), as_ptr<float>(combined_topk_weights));
      },
      release_gil);

  m.def(
      "permute_layout",
      [](uintptr_t topk_idx, int64_t num_rows, int num_topk, int num_local_experts, int64_t expert_alignment,
         int64_t num_out_rows, uintptr_t pair_pos, uintptr_t expert_offsets, uintptr_t num_tokens_per_expert) {
        cpu::permute_layout(as_ptr<const int64_t>(topk_idx), num_rows, num_topk, num_local_experts, expert_alignment,
                            num_out_rows, as_ptr<int32_t>(pair_pos), as_ptr<int64_t>(expert_offsets),
                            as_ptr<int64_t>(num_tokens_per_expert));
      },
      release_gil);

  m.def(
      "permute_rows",
      [](int dtype, uintptr_t x, int64_t num_rows, int64_t hidden, int num_topk, uintptr_t pair_pos,
         uintptr_t topk_weights, uintptr_t expert_offsets, uintptr_t num_tokens_per_expert, int num_local_experts,
         int64_t num_out_rows, uintptr_t out) {
        cpu::permute_rows(static_cast<DType>(dtype), as_ptr<const void>(x), num_rows, hidden, num_topk,
                          as_ptr<const int32_t>(pair_pos), as_ptr<const void>(topk_weights),
                          as_ptr<const int64_t>(expert_offsets), as_ptr<const int64_t>(num_tokens_per_expert),
                          num_local_experts, num_out_rows, as_ptr<void>(out));
      },
      release_gil);

  m.def(
      "unpermute_rows",
      [](int dtype, uintptr_t y, int64_t num_in_rows, int64_t hidden, int num_topk, uintptr_t pair_pos,
         uintptr_t topk_weights, int64_t num_rows, uintptr_t out) {
        cpu::unpermute_rows(static_cast<DType>(dtype), as_ptr<const void>(y), num_in_rows, hidden, num_topk,
                            as_ptr<const int32_t>(pair_pos), as_ptr<const void>(topk_weights), num_rows,
                            as_ptr<void>(out));
      },
      release_gil);

#ifdef EPLIB_WITH_CUDA
  def_cuda_kernels(m);
#endif

  m.def(
      "advise_huge_pages",
      [](uintptr_t address, int64_t num_bytes) { cpu::advise_huge_pages(as_ptr<void>(address), num_bytes); },
      "Back a fresh, untouched host allocation with transparent huge pages (advisory).");

  m.def(
      "peer_dispatch_row_shifts",
      [](uintptr_t rank_prefix_matrix, int rank, int num_ranks, int64_t slot_rows, uintptr_t row_shift) {
        eplib::dispatch_row_shifts(as_ptr<const int32_t>(rank_prefix_matrix), rank, num_ranks, slot_rows,
                                   as_ptr<int64_t>(row_shift));
      },
      "Peer transport: int64 [R] row shifts of this rank's dispatch rows in each receiver's region "
      "(eplib/layout.h), the arithmetic the CUDA send kernel runs; host pointers.");
  m.def(
      "peer_combine_row_shifts",
      [](uintptr_t rank_prefix_matrix, int rank, int num_ranks, int64_t slot_rows, uintptr_t compact_start,
         uintptr_t row_shift) {
        eplib::combine_row_shifts(as_ptr<const int32_t>(rank_prefix_matrix), rank, num_ranks, slot_rows,
                                  as_ptr<const int64_t>(compact_start), as_ptr<int64_t>(row_shift));
      },
      "Peer transport: int64 [R] row shifts of the combine rows this rank sends back to each source.");
  m.def(
      "dispatch_row_stride",
      [](int64_t x_bytes, int64_t scales_bytes, int num_topk) {
        return eplib::make_dispatch_row_layout(x_bytes, scales_bytes, num_topk).stride;
      },
      "Bytes of one packed dispatch row (x, scales, src index, top-k ids and weights, 16-byte aligned).");
  m.def(
      "combine_row_stride",
      [](int64_t x_bytes, int num_topk) { return eplib::make_combine_row_layout(x_bytes, num_topk).stride; },
      "Bytes of one combine row (x, then top-k weights when num_topk > 0).");
}
