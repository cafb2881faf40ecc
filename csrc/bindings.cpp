// The pybind11 module eplib._C. Tensors cross this boundary as raw addresses (tensor.data_ptr())
// plus sizes, so the native core never links against libtorch. The Python transports check
// dtypes, shapes and contiguity before calling in; the GIL is released while kernels run.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <string>
#include <type_traits>
#include <vector>

#include "cpu/kernels.h"
#include "cpu/low_latency.h"
#include "cpu/parallel.h"
#include "cuda/ipc.h"  // plain C++: the ipc buffer's layout sizes are known without CUDA too
#include "eplib/errors.h"
#include "eplib/layout.h"
#ifdef EPLIB_WITH_CUDA
#include "cuda/ipc_buffer.h"
#include "cuda/ipc_exchange.h"
#include "cuda/kernels.h"
#include "cuda/runtime.h"
#endif
#ifdef EPLIB_CUDA_CPU
#include "cuda_cpu/executor.h"
#include "cuda_cpu/selftest.h"
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

bool cuda_cpu_execution() {
#ifdef EPLIB_CUDA_CPU
  return true;
#else
  return false;
#endif
}

// What eplib's CUDA runtime sees (a dict; see cuda/runtime.h). Without CUDA: no devices, no error.
py::dict cuda_device_status() {
  py::dict status;
#ifdef EPLIB_WITH_CUDA
  const eplib::cuda::DeviceStatus queried = eplib::cuda::device_status();
  status["device_count"] = queried.device_count;
  status["error"] = queried.error.empty() ? py::object(py::none()) : py::object(py::str(queried.error));
  status["driver_version"] = queried.driver_version;
  status["runtime_version"] = queried.runtime_version;
#else
  status["device_count"] = 0;
  status["error"] = py::none();
  status["driver_version"] = 0;
  status["runtime_version"] = 0;
#endif
  status["cpu_execution"] = cuda_cpu_execution();
  return status;
}

#ifdef EPLIB_WITH_CUDA
// A field of an argument struct as Python sees it: addresses for pointers, codes for enums.
template <typename Field>
Field field_from_python(py::handle value) {
  if constexpr (std::is_pointer<Field>::value) return reinterpret_cast<Field>(value.cast<uintptr_t>());
  else if constexpr (std::is_enum<Field>::value) return static_cast<Field>(value.cast<int>());
  else return value.cast<Field>();
}

template <typename Field>
py::object field_to_python(const Field& value) {
  if constexpr (std::is_pointer<Field>::value) return py::int_(reinterpret_cast<uintptr_t>(value));
  else if constexpr (std::is_enum<Field>::value) return py::int_(static_cast<int>(value));
  else return py::cast(value);
}

// Binds an argument struct of cuda/kernels.h as _C.<Name>Args: constructed with keywords named as
// its fields (a field not given is zero: a null pointer, a zero size; an unknown name is a
// TypeError), and readable and writable by the same names.
template <typename Struct>
class ArgsBinding {
 public:
  ArgsBinding(py::module_& m, const char* name) : class_(m, name) {
    auto setters = setters_;
    class_.def(py::init([setters](const py::kwargs& kwargs) {
      Struct args{};
      for (const auto& item : kwargs) {
        const std::string key = item.first.cast<std::string>();
        const auto setter = setters->find(key);
        if (setter == setters->end())
          throw py::type_error("eplib: " + std::string(py::str(py::type::of<Struct>().attr("__name__"))) +
                               " has no field " + key);
        setter->second(args, item.second);
      }
      return args;
    }));
  }

  template <typename Field>
  ArgsBinding& field(const char* name, Field Struct::*member) {
    auto set = [member](Struct& args, py::handle value) { args.*member = field_from_python<Field>(value); };
    (*setters_)[name] = set;
    class_.def_property(name, [member](const Struct& args) { return field_to_python(args.*member); }, set);
    return *this;
  }

 private:
  py::class_<Struct> class_;
  std::shared_ptr<std::map<std::string, std::function<void(Struct&, py::handle)>>> setters_ =
      std::make_shared<std::map<std::string, std::function<void(Struct&, py::handle)>>>();
};

#define EPLIB_FIELD(Struct, name) .field(#name, &Struct::name)

void def_kernel_args(py::module_& m) {
  namespace cuda = eplib::cuda;
  using cuda::CombinePackArgs;
  using cuda::CombineReduceArgs;
  using cuda::DispatchCheckArgs;
  using cuda::DispatchLayoutArgs;
  using cuda::DispatchPackArgs;
  using cuda::DispatchUnpackArgs;
  using cuda::PermuteLayoutArgs;
  using cuda::PermuteRowsArgs;
  using cuda::SendPositionsArgs;
  using cuda::UnpermuteRowsArgs;
  ArgsBinding<DispatchLayoutArgs>(m, "DispatchLayoutArgs") EPLIB_FIELD(DispatchLayoutArgs, topk_idx)
      EPLIB_FIELD(DispatchLayoutArgs, num_tokens) EPLIB_FIELD(DispatchLayoutArgs, num_topk)
      EPLIB_FIELD(DispatchLayoutArgs, num_experts) EPLIB_FIELD(DispatchLayoutArgs, num_ranks)
      EPLIB_FIELD(DispatchLayoutArgs, num_tokens_per_rank) EPLIB_FIELD(DispatchLayoutArgs, num_tokens_per_expert)
      EPLIB_FIELD(DispatchLayoutArgs, is_token_in_rank) EPLIB_FIELD(DispatchLayoutArgs, error_flag);
  ArgsBinding<SendPositionsArgs>(m, "SendPositionsArgs") EPLIB_FIELD(SendPositionsArgs, is_token_in_rank)
      EPLIB_FIELD(SendPositionsArgs, num_tokens) EPLIB_FIELD(SendPositionsArgs, num_ranks)
      EPLIB_FIELD(SendPositionsArgs, slot_rows) EPLIB_FIELD(SendPositionsArgs, send_pos)
      EPLIB_FIELD(SendPositionsArgs, num_tokens_per_rank) EPLIB_FIELD(SendPositionsArgs, error_flag);
  ArgsBinding<DispatchCheckArgs>(m, "DispatchCheckArgs") EPLIB_FIELD(DispatchCheckArgs, send_counts)
      EPLIB_FIELD(DispatchCheckArgs, num_tokens_per_rank) EPLIB_FIELD(DispatchCheckArgs, num_ranks)
      EPLIB_FIELD(DispatchCheckArgs, slot_rows) EPLIB_FIELD(DispatchCheckArgs, topk_idx)
      EPLIB_FIELD(DispatchCheckArgs, topk_weights) EPLIB_FIELD(DispatchCheckArgs, num_tokens)
      EPLIB_FIELD(DispatchCheckArgs, num_topk) EPLIB_FIELD(DispatchCheckArgs, num_tokens_per_expert)
      EPLIB_FIELD(DispatchCheckArgs, num_experts) EPLIB_FIELD(DispatchCheckArgs, error_flag);
  ArgsBinding<DispatchPackArgs>(m, "DispatchPackArgs") EPLIB_FIELD(DispatchPackArgs, x)
      EPLIB_FIELD(DispatchPackArgs, x_bytes) EPLIB_FIELD(DispatchPackArgs, x_scales)
      EPLIB_FIELD(DispatchPackArgs, scales_bytes) EPLIB_FIELD(DispatchPackArgs, scales_token_stride)
      EPLIB_FIELD(DispatchPackArgs, scales_column_stride) EPLIB_FIELD(DispatchPackArgs, topk_idx)
      EPLIB_FIELD(DispatchPackArgs, topk_weights) EPLIB_FIELD(DispatchPackArgs, num_topk)
      EPLIB_FIELD(DispatchPackArgs, num_experts) EPLIB_FIELD(DispatchPackArgs, send_pos)
      EPLIB_FIELD(DispatchPackArgs, num_tokens) EPLIB_FIELD(DispatchPackArgs, num_ranks)
      EPLIB_FIELD(DispatchPackArgs, slot_rows) EPLIB_FIELD(DispatchPackArgs, rank_prefix_matrix)
      EPLIB_FIELD(DispatchPackArgs, send_buffer) EPLIB_FIELD(DispatchPackArgs, error_flag);
  ArgsBinding<DispatchUnpackArgs>(m, "DispatchUnpackArgs") EPLIB_FIELD(DispatchUnpackArgs, recv_buffer)
      EPLIB_FIELD(DispatchUnpackArgs, recv_counts) EPLIB_FIELD(DispatchUnpackArgs, num_ranks)
      EPLIB_FIELD(DispatchUnpackArgs, slot_rows) EPLIB_FIELD(DispatchUnpackArgs, num_out_rows)
      EPLIB_FIELD(DispatchUnpackArgs, x_bytes) EPLIB_FIELD(DispatchUnpackArgs, scales_bytes)
      EPLIB_FIELD(DispatchUnpackArgs, num_topk) EPLIB_FIELD(DispatchUnpackArgs, num_local_experts)
      EPLIB_FIELD(DispatchUnpackArgs, recv_x) EPLIB_FIELD(DispatchUnpackArgs, recv_x_scales)
      EPLIB_FIELD(DispatchUnpackArgs, recv_src_idx) EPLIB_FIELD(DispatchUnpackArgs, recv_topk_idx)
      EPLIB_FIELD(DispatchUnpackArgs, recv_topk_weights) EPLIB_FIELD(DispatchUnpackArgs, num_recv_tokens_per_expert)
      EPLIB_FIELD(DispatchUnpackArgs, num_recv_out) EPLIB_FIELD(DispatchUnpackArgs, error_flag);
  ArgsBinding<CombinePackArgs>(m, "CombinePackArgs") EPLIB_FIELD(CombinePackArgs, x)
      EPLIB_FIELD(CombinePackArgs, x_bytes) EPLIB_FIELD(CombinePackArgs, topk_weights)
      EPLIB_FIELD(CombinePackArgs, num_topk) EPLIB_FIELD(CombinePackArgs, recv_counts)
      EPLIB_FIELD(CombinePackArgs, num_ranks) EPLIB_FIELD(CombinePackArgs, slot_rows)
      EPLIB_FIELD(CombinePackArgs, num_rows) EPLIB_FIELD(CombinePackArgs, send_buffer);
  ArgsBinding<CombineReduceArgs>(m, "CombineReduceArgs") EPLIB_FIELD(CombineReduceArgs, dtype)
      EPLIB_FIELD(CombineReduceArgs, recv_buffer) EPLIB_FIELD(CombineReduceArgs, hidden)
      EPLIB_FIELD(CombineReduceArgs, num_topk) EPLIB_FIELD(CombineReduceArgs, send_pos)
      EPLIB_FIELD(CombineReduceArgs, num_tokens) EPLIB_FIELD(CombineReduceArgs, num_ranks)
      EPLIB_FIELD(CombineReduceArgs, bias_0) EPLIB_FIELD(CombineReduceArgs, bias_1)
      EPLIB_FIELD(CombineReduceArgs, combined_x) EPLIB_FIELD(CombineReduceArgs, combined_topk_weights);
  ArgsBinding<cuda::IpcExchangeArgs>(m, "IpcExchangeArgs") EPLIB_FIELD(cuda::IpcExchangeArgs, num_channels)
      EPLIB_FIELD(cuda::IpcExchangeArgs, ring_rows) EPLIB_FIELD(cuda::IpcExchangeArgs, chunk_rows)
      EPLIB_FIELD(cuda::IpcExchangeArgs, channel_counts) EPLIB_FIELD(cuda::IpcExchangeArgs, rejected)
      EPLIB_FIELD(cuda::IpcExchangeArgs, error_flag);
  ArgsBinding<PermuteLayoutArgs>(m, "PermuteLayoutArgs") EPLIB_FIELD(PermuteLayoutArgs, topk_idx)
      EPLIB_FIELD(PermuteLayoutArgs, num_rows) EPLIB_FIELD(PermuteLayoutArgs, num_topk)
      EPLIB_FIELD(PermuteLayoutArgs, num_local_experts) EPLIB_FIELD(PermuteLayoutArgs, expert_alignment)
      EPLIB_FIELD(PermuteLayoutArgs, num_out_rows) EPLIB_FIELD(PermuteLayoutArgs, pair_pos)
      EPLIB_FIELD(PermuteLayoutArgs, expert_offsets) EPLIB_FIELD(PermuteLayoutArgs, num_tokens_per_expert)
      EPLIB_FIELD(PermuteLayoutArgs, error_flag);
  ArgsBinding<PermuteRowsArgs>(m, "PermuteRowsArgs") EPLIB_FIELD(PermuteRowsArgs, dtype)
      EPLIB_FIELD(PermuteRowsArgs, x) EPLIB_FIELD(PermuteRowsArgs, num_rows) EPLIB_FIELD(PermuteRowsArgs, hidden)
      EPLIB_FIELD(PermuteRowsArgs, num_topk) EPLIB_FIELD(PermuteRowsArgs, pair_pos)
      EPLIB_FIELD(PermuteRowsArgs, topk_weights) EPLIB_FIELD(PermuteRowsArgs, expert_offsets)
      EPLIB_FIELD(PermuteRowsArgs, num_tokens_per_expert) EPLIB_FIELD(PermuteRowsArgs, num_local_experts)
      EPLIB_FIELD(PermuteRowsArgs, num_out_rows) EPLIB_FIELD(PermuteRowsArgs, out);
  ArgsBinding<UnpermuteRowsArgs>(m, "UnpermuteRowsArgs") EPLIB_FIELD(UnpermuteRowsArgs, dtype)
      EPLIB_FIELD(UnpermuteRowsArgs, y) EPLIB_FIELD(UnpermuteRowsArgs, num_in_rows)
      EPLIB_FIELD(UnpermuteRowsArgs, hidden) EPLIB_FIELD(UnpermuteRowsArgs, num_topk)
      EPLIB_FIELD(UnpermuteRowsArgs, pair_pos) EPLIB_FIELD(UnpermuteRowsArgs, topk_weights)
      EPLIB_FIELD(UnpermuteRowsArgs, num_rows) EPLIB_FIELD(UnpermuteRowsArgs, out);
}

// The low-latency kernels' argument structs (cuda/kernels.h, csrc/cuda/low_latency.cu).
void def_low_latency_kernel_args(py::module_& m) {
  namespace cuda = eplib::cuda;
  using cuda::LLCombinePackArgs;
  using cuda::LLCombineReduceArgs;
  using cuda::LLDispatchPackArgs;
  using cuda::LLDispatchUnpackArgs;
  using cuda::LLLayoutArgs;
  ArgsBinding<LLLayoutArgs>(m, "LLLayoutArgs") EPLIB_FIELD(LLLayoutArgs, topk_idx) EPLIB_FIELD(LLLayoutArgs, num_tokens)
      EPLIB_FIELD(LLLayoutArgs, num_topk) EPLIB_FIELD(LLLayoutArgs, num_experts) EPLIB_FIELD(LLLayoutArgs, num_ranks)
      EPLIB_FIELD(LLLayoutArgs, send_slot) EPLIB_FIELD(LLLayoutArgs, send_counts)
      EPLIB_FIELD(LLLayoutArgs, send_offset) EPLIB_FIELD(LLLayoutArgs, error_flag);
  ArgsBinding<LLDispatchPackArgs>(m, "LLDispatchPackArgs") EPLIB_FIELD(LLDispatchPackArgs, x)
      EPLIB_FIELD(LLDispatchPackArgs, num_tokens) EPLIB_FIELD(LLDispatchPackArgs, num_max)
      EPLIB_FIELD(LLDispatchPackArgs, hidden) EPLIB_FIELD(LLDispatchPackArgs, num_topk)
      EPLIB_FIELD(LLDispatchPackArgs, num_experts) EPLIB_FIELD(LLDispatchPackArgs, num_ranks)
      EPLIB_FIELD(LLDispatchPackArgs, format) EPLIB_FIELD(LLDispatchPackArgs, rejected)
      EPLIB_FIELD(LLDispatchPackArgs, topk_idx) EPLIB_FIELD(LLDispatchPackArgs, send_slot)
      EPLIB_FIELD(LLDispatchPackArgs, send_counts) EPLIB_FIELD(LLDispatchPackArgs, send_offset)
      EPLIB_FIELD(LLDispatchPackArgs, messages) EPLIB_FIELD(LLDispatchPackArgs, mask);
  ArgsBinding<LLDispatchUnpackArgs>(m, "LLDispatchUnpackArgs") EPLIB_FIELD(LLDispatchUnpackArgs, messages)
      EPLIB_FIELD(LLDispatchUnpackArgs, mask) EPLIB_FIELD(LLDispatchUnpackArgs, poisoned)
      EPLIB_FIELD(LLDispatchUnpackArgs, num_max) EPLIB_FIELD(LLDispatchUnpackArgs, hidden)
      EPLIB_FIELD(LLDispatchUnpackArgs, num_topk) EPLIB_FIELD(LLDispatchUnpackArgs, num_experts)
      EPLIB_FIELD(LLDispatchUnpackArgs, num_ranks) EPLIB_FIELD(LLDispatchUnpackArgs, format)
      EPLIB_FIELD(LLDispatchUnpackArgs, recv_x) EPLIB_FIELD(LLDispatchUnpackArgs, recv_scales)
      EPLIB_FIELD(LLDispatchUnpackArgs, src_info) EPLIB_FIELD(LLDispatchUnpackArgs, layout_range)
      EPLIB_FIELD(LLDispatchUnpackArgs, recv_count) EPLIB_FIELD(LLDispatchUnpackArgs, cumulative_stats)
      EPLIB_FIELD(LLDispatchUnpackArgs, error_flag);
  ArgsBinding<LLCombinePackArgs>(m, "LLCombinePackArgs") EPLIB_FIELD(LLCombinePackArgs, x)
      EPLIB_FIELD(LLCombinePackArgs, layout_range) EPLIB_FIELD(LLCombinePackArgs, num_max)
      EPLIB_FIELD(LLCombinePackArgs, hidden) EPLIB_FIELD(LLCombinePackArgs, num_topk)
      EPLIB_FIELD(LLCombinePackArgs, num_experts) EPLIB_FIELD(LLCombinePackArgs, num_ranks)
      EPLIB_FIELD(LLCombinePackArgs, num_tokens) EPLIB_FIELD(LLCombinePackArgs, messages)
      EPLIB_FIELD(LLCombinePackArgs, mask);
  ArgsBinding<LLCombineReduceArgs>(m, "LLCombineReduceArgs") EPLIB_FIELD(LLCombineReduceArgs, messages)
      EPLIB_FIELD(LLCombineReduceArgs, mask) EPLIB_FIELD(LLCombineReduceArgs, poisoned)
      EPLIB_FIELD(LLCombineReduceArgs, num_max) EPLIB_FIELD(LLCombineReduceArgs, hidden)
      EPLIB_FIELD(LLCombineReduceArgs, num_topk) EPLIB_FIELD(LLCombineReduceArgs, num_experts)
      EPLIB_FIELD(LLCombineReduceArgs, num_ranks) EPLIB_FIELD(LLCombineReduceArgs, topk_idx)
      EPLIB_FIELD(LLCombineReduceArgs, topk_weights) EPLIB_FIELD(LLCombineReduceArgs, num_tokens)
      EPLIB_FIELD(LLCombineReduceArgs, send_slot) EPLIB_FIELD(LLCombineReduceArgs, send_offset)
      EPLIB_FIELD(LLCombineReduceArgs, out) EPLIB_FIELD(LLCombineReduceArgs, error_flag);
  ArgsBinding<cuda::LLSyncArgs>(m, "LLSyncArgs") EPLIB_FIELD(cuda::LLSyncArgs, step)
      EPLIB_FIELD(cuda::LLSyncArgs, buffer_index) EPLIB_FIELD(cuda::LLSyncArgs, mask)
      EPLIB_FIELD(cuda::LLSyncArgs, poisoned) EPLIB_FIELD(cuda::LLSyncArgs, shrink)
      EPLIB_FIELD(cuda::LLSyncArgs, wait_stats);
}

#undef EPLIB_FIELD

cudaStream_t stream_of(uintptr_t stream) { return reinterpret_cast<cudaStream_t>(stream); }

// _C.cuda_<kernel>(args, device, stream): the launcher of cuda/kernels.h on `stream`
// (torch.cuda.current_stream().cuda_stream) with `device` current for the call (DeviceGuard).
template <typename Args>
void def_kernel(py::module_& m, const char* name, std::function<void(const Args&, cudaStream_t)> launcher) {
  m.def(
      name,
      [launcher](const Args& args, int device, uintptr_t stream) {
        eplib::cuda::DeviceGuard guard(device);
        launcher(args, stream_of(stream));
      },
      py::arg("args"), py::arg("device"), py::arg("stream"), py::call_guard<py::gil_scoped_release>());
}

void def_cuda_kernels(py::module_& m) {
  namespace cuda = eplib::cuda;
  using cuda::IpcBuffer;
  const auto release_gil = py::call_guard<py::gil_scoped_release>();
  def_kernel_args(m);

  def_kernel<cuda::DispatchLayoutArgs>(m, "cuda_dispatch_layout", cuda::dispatch_layout);
  def_kernel<cuda::SendPositionsArgs>(m, "cuda_send_positions", cuda::send_positions);
  def_kernel<cuda::DispatchCheckArgs>(m, "cuda_check_dispatch_inputs", cuda::check_dispatch_inputs);
  // The row kernels of the nccl transport; the ipc transport's exchanges go through IpcBuffer.
  def_kernel<cuda::DispatchPackArgs>(m, "cuda_dispatch_pack", cuda::dispatch_pack);
  def_kernel<cuda::DispatchUnpackArgs>(m, "cuda_dispatch_unpack", cuda::dispatch_unpack);
  def_kernel<cuda::CombinePackArgs>(m, "cuda_combine_pack", cuda::combine_pack);
  def_kernel<cuda::CombineReduceArgs>(m, "cuda_combine_reduce", cuda::combine_reduce);
  def_kernel<cuda::PermuteLayoutArgs>(m, "cuda_permute_layout", cuda::permute_layout);
  def_kernel<cuda::PermuteRowsArgs>(m, "cuda_permute_rows", cuda::permute_rows);
  def_kernel<cuda::UnpermuteRowsArgs>(m, "cuda_unpermute_rows", cuda::unpermute_rows);
  def_low_latency_kernel_args(m);
  def_kernel<cuda::LLLayoutArgs>(m, "cuda_ll_layout", cuda::ll_layout);
  def_kernel<cuda::LLDispatchPackArgs>(m, "cuda_ll_dispatch_pack", cuda::ll_dispatch_pack);
  def_kernel<cuda::LLDispatchUnpackArgs>(m, "cuda_ll_dispatch_unpack", cuda::ll_dispatch_unpack);
  def_kernel<cuda::LLCombinePackArgs>(m, "cuda_ll_combine_pack", cuda::ll_combine_pack);
  def_kernel<cuda::LLCombineReduceArgs>(m, "cuda_ll_combine_reduce", cuda::ll_combine_reduce);
  m.def("cuda_current_device", &cuda::current_device, "eplib's CUDA runtime's current device on this thread.");
  m.def(
      "cuda_preload_kernels",
      [](int device) {
        cuda::DeviceGuard guard(device);
        cuda::preload_kernels();
      },
      py::arg("device"), "Loads every eplib kernel on `device` now rather than at its first launch (lazy loading).");

  py::class_<IpcBuffer>(m, "IpcBuffer",
                        "One rank's ipc buffer (cuda/ipc_buffer.h): export, import of the peers, counts exchange, "
                        "row exchanges, host-mapped status, teardown.")
      .def(py::init<int, int, int64_t, int>(), py::arg("rank"), py::arg("num_ranks"), py::arg("num_bytes"),
           py::arg("device"))
      .def("ipc_handle", [](const IpcBuffer& self) { return py::bytes(self.ipc_handle()); })
      .def(
          "open_peers",
          [](IpcBuffer& self, const std::vector<py::bytes>& handles) {
            std::vector<std::string> raw(handles.begin(), handles.end());
            self.open_peers(raw);
          },
          py::arg("handles"))
      .def("destroy", &IpcBuffer::destroy, py::arg("timeout_s"), release_gil)
      .def("close_peers", &IpcBuffer::close_peers)
      .def_property_readonly("is_open", &IpcBuffer::is_open)
      .def_property_readonly("num_bytes", &IpcBuffer::num_bytes)
      .def_property_readonly("region_bytes", &IpcBuffer::region_bytes)
      .def("set_timeout", &IpcBuffer::set_timeout, py::arg("seconds"))
      .def("timeout_report", &IpcBuffer::timeout_report)
      .def("rejection_report", &IpcBuffer::rejection_report)
      .def("clear_rejection_report", &IpcBuffer::clear_rejection_report)
      .def(
          "counters",
          [](const IpcBuffer& self) {
            const IpcBuffer::Counters counters = self.counters();
            py::dict result;
            result["round"] = counters.round;
            result["rows_sent"] = counters.rows_sent;
            result["rows_received"] = counters.rows_received;
            result["notify_round"] = counters.notify_round;
            result["barrier_round"] = counters.barrier_round;
            result["blocks_finished"] = counters.blocks_finished;
            result["aborted"] = counters.aborted;
            return result;
          },
          "The own header's local counters (synchronizes the device; tests and diagnostics).")
      .def(
          "notify",
          [](IpcBuffer& self, uintptr_t error_flag, const std::vector<int64_t>& fields, uintptr_t send_counts,
             uintptr_t num_tokens_per_expert, int num_experts, uintptr_t count_matrix, bool host_wait,
             uintptr_t stream) {
            cuda::NotifyFields packed{};
            if (fields.size() != std::size(packed.values))
              throw std::invalid_argument("eplib: notify takes " + std::to_string(std::size(packed.values)) +
                                          " format fields, got " + std::to_string(fields.size()));
            std::copy(fields.begin(), fields.end(), packed.values);
            py::gil_scoped_release released;
            self.notify(as_ptr<const int32_t>(error_flag), packed, as_ptr<const int32_t>(send_counts),
                        as_ptr<const int32_t>(num_tokens_per_expert), num_experts, as_ptr<int32_t>(count_matrix),
                        host_wait, stream_of(stream));
          },
          py::arg("error_flag"), py::arg("fields"), py::arg("send_counts"), py::arg("num_tokens_per_expert"),
          py::arg("num_experts"), py::arg("count_matrix"), py::arg("host_wait"), py::arg("stream"))
      .def("wait_notify", &IpcBuffer::wait_notify, py::arg("timeout_s"), release_gil)
      .def(
          "dispatch",
          [](IpcBuffer& self, const cuda::DispatchPackArgs& pack, const cuda::DispatchUnpackArgs& unpack,
             const cuda::IpcExchangeArgs& exchange, uintptr_t stream) {
            self.dispatch(pack, unpack, exchange, stream_of(stream));
          },
          py::arg("pack"), py::arg("unpack"), py::arg("exchange"), py::arg("stream"), release_gil,
          "One dispatch round through the rings (cuda/ipc_exchange.h).")
      .def(
          "combine",
          [](IpcBuffer& self, const cuda::CombinePackArgs& pack, const cuda::CombineReduceArgs& reduce,
             const cuda::IpcExchangeArgs& exchange, uintptr_t stream) {
            self.combine(pack, reduce, exchange, stream_of(stream));
          },
          py::arg("pack"), py::arg("reduce"), py::arg("exchange"), py::arg("stream"), release_gil,
          "One combine round through the rings (cuda/ipc_exchange.h).")
      .def(
          "join_rejected",
          [](IpcBuffer& self, bool combine, const cuda::IpcExchangeArgs& exchange, uintptr_t stream) {
            self.join_rejected(combine, exchange, stream_of(stream));
          },
          py::arg("combine"), py::arg("exchange"), py::arg("stream"), release_gil,
          "A rejected participant's dispatch or combine round: no rows (cuda/ipc.h \"Rejected rounds\").")
      .def(
          "low_latency_sync",
          [](IpcBuffer& self, const cuda::LLSyncArgs& args, uintptr_t stream) {
            self.low_latency_sync(args, stream_of(stream));
          },
          py::arg("args"), py::arg("stream"), release_gil,
          "One step of the low-latency protocol (cuda/low_latency_ipc.h).")
      .def("region_addresses", &IpcBuffer::region_addresses,
           "The address of every rank's region as this process maps it.");
  py::dict steps;
  steps["wait_freed"] = static_cast<int>(cuda::kLLWaitFreed);
  steps["publish_arrived"] = static_cast<int>(cuda::kLLPublishArrived);
  steps["wait_arrived"] = static_cast<int>(cuda::kLLWaitArrived);
  steps["publish_freed"] = static_cast<int>(cuda::kLLPublishFreed);
  m.attr("LL_SYNC_STEPS") = steps;
  m.attr("LL_IPC_SLOTS_OFFSET") = cuda::kLLIpcSlotsOffset;
}
#endif

#ifdef EPLIB_CUDA_CPU
// Raises RuntimeError for a failed call of the CPU execution's runtime (the error is consumed).
void check_runtime(cudaError_t error, const char* what) {
  if (error == cudaSuccess) return;
  (void)cudaGetLastError();
  throw std::runtime_error(std::string("eplib CPU execution: ") + what + ": " + cudaGetErrorString(error));
}

// The CPU execution's own controls (streams, events, last error, statistics), for the emulated
// transports and the tests: what torch.cuda offers on a GPU.
void def_cuda_cpu(py::module_& m) {
  const auto release_gil = py::call_guard<py::gil_scoped_release>();
  m.def("cuda_cpu_stream_create", [] {
    cudaStream_t stream;
    check_runtime(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking), "cudaStreamCreateWithFlags");
    return reinterpret_cast<uintptr_t>(stream);
  });
  m.def(
      "cuda_cpu_stream_destroy", [](uintptr_t stream) { check_runtime(cudaStreamDestroy(stream_of(stream)), "cudaStreamDestroy"); },
      release_gil);
  m.def(
      "cuda_cpu_stream_synchronize",
      [](uintptr_t stream) { check_runtime(cudaStreamSynchronize(stream_of(stream)), "cudaStreamSynchronize"); },
      release_gil);
  m.def(
      "cuda_cpu_device_synchronize", [] { check_runtime(cudaDeviceSynchronize(), "cudaDeviceSynchronize"); },
      release_gil);
  m.def("cuda_cpu_memcpy_async", [](uintptr_t destination, uintptr_t source, size_t bytes, uintptr_t stream) {
    check_runtime(cudaMemcpyAsync(as_ptr<void>(destination), as_ptr<const void>(source), bytes, cudaMemcpyDefault,
                                  stream_of(stream)),
                  "cudaMemcpyAsync");
  });
  m.def("cuda_cpu_event_create", [] {
    cudaEvent_t event;
    check_runtime(cudaEventCreateWithFlags(&event, cudaEventDisableTiming), "cudaEventCreateWithFlags");
    return reinterpret_cast<uintptr_t>(event);
  });
  m.def("cuda_cpu_event_record", [](uintptr_t event, uintptr_t stream) {
    check_runtime(cudaEventRecord(reinterpret_cast<cudaEvent_t>(event), stream_of(stream)), "cudaEventRecord");
  });
  m.def("cuda_cpu_event_query", [](uintptr_t event) {
    return static_cast<int>(cudaEventQuery(reinterpret_cast<cudaEvent_t>(event)));  // the raw answer
  });
  m.def(
      "cuda_cpu_event_destroy",
      [](uintptr_t event) { check_runtime(cudaEventDestroy(reinterpret_cast<cudaEvent_t>(event)), "cudaEventDestroy"); },
      release_gil);
  m.def("cuda_cpu_stream_wait_event", [](uintptr_t stream, uintptr_t event) {
    check_runtime(cudaStreamWaitEvent(stream_of(stream), reinterpret_cast<cudaEvent_t>(event)), "cudaStreamWaitEvent");
  });
  m.def("cuda_cpu_peek_last_error", [] { return static_cast<int>(cudaPeekAtLastError()); });
  m.def("cuda_cpu_get_last_error", [] { return static_cast<int>(cudaGetLastError()); });
  m.def("cuda_cpu_set_device", [](int device) { check_runtime(cudaSetDevice(device), "cudaSetDevice"); });
  m.def("cuda_cpu_statistics", [] {
    const eplib_cuda_cpu::Statistics statistics = eplib_cuda_cpu::statistics();
    py::dict result;
    result["launches"] = statistics.launches;
    result["lazy_load_waits"] = statistics.lazy_load_waits;  // {kernel: launches that waited}
    result["seed"] = statistics.seed;
    return result;
  });
  m.def("cuda_cpu_stall", &eplib_cuda_cpu::set_stall, py::arg("kernel"), py::arg("seconds"),
        py::arg("probability") = 1.0, py::arg("first_block") = 0, py::arg("end_block") = 0xFFFFFFFFu,
        "Test hook: blocks [first_block, end_block) of `kernel` (a __global__ name) sleep `seconds` whenever one "
        "of their barriers or warp intrinsics completes, with that probability (a slow SM); seconds <= 0 removes it.");
  m.attr("CUDA_ERROR_NOT_READY") = static_cast<int>(cudaErrorNotReady);
  m.attr("CUDA_ERROR_INVALID_CONTEXT") = static_cast<int>(cudaErrorInvalidContext);

  // The CPU execution's self-test kernels (cuda_cpu/selftest.h), pointers as addresses.
  namespace selftest = eplib_cuda_cpu::selftest;
  m.def(
      "cuda_cpu_selftest_warp_intrinsics",
      [](uintptr_t out, int threads, uintptr_t stream) { selftest::warp_intrinsics(as_ptr<int64_t>(out), threads, stream_of(stream)); },
      release_gil);
  m.def(
      "cuda_cpu_selftest_shared_memory",
      [](uintptr_t out, int blocks, int threads, bool with_barrier, uintptr_t stream) {
        selftest::shared_memory(as_ptr<int32_t>(out), blocks, threads, with_barrier, stream_of(stream));
      },
      release_gil);
  m.def(
      "cuda_cpu_selftest_misaligned",
      [](uintptr_t buffer, uintptr_t stream) { selftest::misaligned(as_ptr<uint8_t>(buffer), stream_of(stream)); },
      release_gil);
  m.def("cuda_cpu_selftest_divergent_barrier", [](uintptr_t stream) { selftest::divergent_barrier(stream_of(stream)); },
        release_gil);
  m.def(
      "cuda_cpu_selftest_busy",
      [](uint64_t nanoseconds, uintptr_t counter, int threads, uintptr_t stream) {
        selftest::busy(nanoseconds, as_ptr<int32_t>(counter), threads, stream_of(stream));
      },
      release_gil);
  m.def("cuda_cpu_selftest_open_own_ipc_handle", &selftest::open_own_ipc_handle);
}
#endif


// ---------------------------------------------------------------------------------------------
// Low-latency mode, CPU side (cpu/low_latency.h): the kernels on raw addresses and the shared host
// memory of the cpu transport. A layout is passed as (num_max, hidden, num_topk, num_local_experts,
// fp8); message addresses as lists of ints (0: a masked rank).
// ---------------------------------------------------------------------------------------------

template <typename Pointer>
std::vector<Pointer> addresses(const std::vector<uintptr_t>& values) {
  std::vector<Pointer> pointers;
  pointers.reserve(values.size());
  for (const uintptr_t value : values) pointers.push_back(reinterpret_cast<Pointer>(value));
  return pointers;
}

std::vector<int32_t> header_fields(const std::vector<int32_t>& fields) {
  if (fields.size() != static_cast<size_t>(eplib::kLLHeaderFields))
    throw std::invalid_argument("eplib: a low-latency header has " + std::to_string(eplib::kLLHeaderFields) +
                                " fields, got " + std::to_string(fields.size()));
  return fields;
}

void def_low_latency_cpu(py::module_& m) {
  namespace cpu = eplib::cpu;
  using eplib::LowLatencyLayout;
  using eplib::make_low_latency_layout;
  const auto release_gil = py::call_guard<py::gil_scoped_release>();
  m.attr("LL_HEADER_FIELDS") = static_cast<int>(eplib::kLLHeaderFields);
  m.attr("LL_MAGIC") = eplib::kLLMagic;
  m.attr("LL_MAX_TOPK") = eplib::kLLMaxTopk;
  {
    py::dict fields, formats;
    fields["magic"] = static_cast<int>(eplib::kLLFieldMagic);
    fields["num_max"] = static_cast<int>(eplib::kLLFieldNumMax);
    fields["hidden"] = static_cast<int>(eplib::kLLFieldHidden);
    fields["num_experts"] = static_cast<int>(eplib::kLLFieldNumExperts);
    fields["num_topk"] = static_cast<int>(eplib::kLLFieldNumTopk);
    fields["format"] = static_cast<int>(eplib::kLLFieldFormat);
    fields["rejected"] = static_cast<int>(eplib::kLLFieldRejected);
    fields["num_tokens"] = static_cast<int>(eplib::kLLFieldNumTokens);
    fields["pulled"] = static_cast<int>(eplib::kLLFieldPulled);
    formats["fp8"] = static_cast<int>(eplib::kLLFp8);
    formats["round_scale"] = static_cast<int>(eplib::kLLRoundScale);
    formats["ue8m0"] = static_cast<int>(eplib::kLLUe8m0);
    formats["combine"] = static_cast<int>(eplib::kLLCombine);
    m.attr("LL_FIELDS") = fields;
    m.attr("LL_FORMATS") = formats;
  }
  m.def(
      "low_latency_layout",
      [](int64_t num_max, int64_t hidden, int num_topk, int num_local_experts, bool fp8) {
        const LowLatencyLayout layout = make_low_latency_layout(num_max, hidden, num_topk, num_local_experts, fp8);
        py::dict sizes;
        sizes["header_bytes"] = layout.header_bytes;
        sizes["dispatch_stride"] = layout.dispatch_stride;
        sizes["combine_stride"] = layout.combine_stride;
        sizes["capacity"] = layout.capacity;
        sizes["message_bytes"] = layout.message_bytes;
        sizes["published_bytes"] = eplib::ll_published_bytes(num_max, hidden, num_topk);
        return sizes;
      },
      "Sizes of the low-latency messages of a call (eplib/low_latency.h): header_bytes, dispatch_stride, "
      "combine_stride, capacity (rows), message_bytes and published_bytes (of a published dispatch).");
  m.def(
      "ll_layout",
      [](uintptr_t topk_idx, int64_t num_tokens, int num_topk, int num_experts, int num_ranks, uintptr_t send_slot,
         uintptr_t send_counts, uintptr_t send_offset) {
        cpu::ll_layout(as_ptr<const int64_t>(topk_idx), num_tokens, num_topk, num_experts, num_ranks,
                       as_ptr<int32_t>(send_slot), as_ptr<int32_t>(send_counts), as_ptr<int32_t>(send_offset));
      },
      release_gil);
  m.def(
      "ll_quantize",
      [](uintptr_t x, int64_t num_tokens, int64_t hidden, bool round_scale, uintptr_t values, uintptr_t scales) {
        for (int64_t t = 0; t < num_tokens; ++t)
          cpu::ll_quantize_row(as_ptr<const eplib::bf16_t>(x) + t * hidden, hidden, round_scale,
                               as_ptr<uint8_t>(values) + t * hidden, as_ptr<float>(scales) + t * (hidden / 128));
      },
      release_gil, "bf16 x [T, H] -> FP8 values [T, H] and scale_inv float32 [T, H / 128], as a dispatch casts them.");
  m.def(
      "ll_write_header",
      [](uintptr_t message, int64_t num_max, int64_t hidden, int num_topk, int num_local_experts, bool fp8,
         const std::vector<int32_t>& fields, const std::vector<int32_t>& counts) {
        const LowLatencyLayout layout = make_low_latency_layout(num_max, hidden, num_topk, num_local_experts, fp8);
        if (counts.size() != static_cast<size_t>(num_local_experts))
          throw std::invalid_argument("eplib: ll_write_header needs one count per local expert");
        cpu::ll_write_header(as_ptr<uint8_t>(message), layout, header_fields(fields).data(), counts.data());
      });
  m.def("ll_message_status",
        [](uintptr_t message, int64_t num_max, int64_t hidden, int num_topk, int num_local_experts, bool fp8,
           const std::vector<int32_t>& fields) {
          const LowLatencyLayout layout = make_low_latency_layout(num_max, hidden, num_topk, num_local_experts, fp8);
          return cpu::ll_message_status(as_ptr<const uint8_t>(message), layout, header_fields(fields).data());
        });
  m.def(
      "ll_dispatch_pack",
      [](uintptr_t x, int64_t num_tokens, int64_t num_max, int64_t hidden, int num_topk, int num_local_experts,
         bool fp8, bool round_scale, uintptr_t topk_idx, int num_experts, int num_ranks, uintptr_t send_slot,
         uintptr_t send_counts, uintptr_t send_offset, const std::vector<int32_t>& fields,
         const std::vector<uintptr_t>& messages) {
        const LowLatencyLayout layout = make_low_latency_layout(num_max, hidden, num_topk, num_local_experts, fp8);
        cpu::ll_dispatch_pack(as_ptr<const eplib::bf16_t>(x), num_tokens, layout, round_scale,
                              as_ptr<const int64_t>(topk_idx), num_topk, num_experts, num_ranks,
                              as_ptr<const int32_t>(send_slot), as_ptr<const int32_t>(send_counts),
                              as_ptr<const int32_t>(send_offset), header_fields(fields).data(),
                              addresses<uint8_t*>(messages));
      },
      release_gil);
  m.def(
      "ll_dispatch_unpack",
      [](const std::vector<uintptr_t>& messages, int64_t num_max, int64_t hidden, int num_topk, int num_local_experts,
         bool fp8, bool ue8m0, uintptr_t recv_x, uintptr_t recv_scales, uintptr_t src_info, uintptr_t layout_range,
         uintptr_t recv_count, uintptr_t cumulative_stats) {
        const LowLatencyLayout layout = make_low_latency_layout(num_max, hidden, num_topk, num_local_experts, fp8);
        cpu::ll_dispatch_unpack(addresses<const uint8_t*>(messages), layout, ue8m0, as_ptr<uint8_t>(recv_x),
                                as_ptr<uint8_t>(recv_scales), as_ptr<int32_t>(src_info), as_ptr<int64_t>(layout_range),
                                as_ptr<int32_t>(recv_count), as_ptr<int32_t>(cumulative_stats));
      },
      release_gil);
  m.def(
      "ll_dispatch_publish",
      [](uintptr_t x, int64_t num_tokens, int64_t num_max, int64_t hidden, int num_topk, int num_local_experts,
         bool fp8, bool round_scale, uintptr_t topk_idx, const std::vector<int32_t>& fields, uintptr_t published) {
        const LowLatencyLayout layout = make_low_latency_layout(num_max, hidden, num_topk, num_local_experts, fp8);
        cpu::ll_dispatch_publish(as_ptr<const eplib::bf16_t>(x), num_tokens, layout, round_scale,
                                 as_ptr<const int64_t>(topk_idx), num_topk, header_fields(fields).data(),
                                 as_ptr<uint8_t>(published));
      },
      release_gil);
  m.def("ll_published_status",
        [](uintptr_t published, int64_t num_max, int64_t hidden, int num_topk, int num_local_experts, bool fp8,
           const std::vector<int32_t>& fields) {
          const LowLatencyLayout layout = make_low_latency_layout(num_max, hidden, num_topk, num_local_experts, fp8);
          return cpu::ll_published_status(as_ptr<const uint8_t>(published), layout, header_fields(fields).data());
        });
  m.def(
      "ll_dispatch_pull",
      [](const std::vector<uintptr_t>& published, int64_t num_max, int64_t hidden, int num_topk, int num_local_experts,
         bool fp8, int rank, bool ue8m0, uintptr_t recv_x, uintptr_t recv_scales, uintptr_t src_info,
         uintptr_t layout_range, uintptr_t recv_count, uintptr_t cumulative_stats) {
        const LowLatencyLayout layout = make_low_latency_layout(num_max, hidden, num_topk, num_local_experts, fp8);
        cpu::ll_dispatch_pull(addresses<const uint8_t*>(published), layout, num_topk, rank, ue8m0,
                              as_ptr<uint8_t>(recv_x), as_ptr<uint8_t>(recv_scales), as_ptr<int32_t>(src_info),
                              as_ptr<int64_t>(layout_range), as_ptr<int32_t>(recv_count),
                              as_ptr<int32_t>(cumulative_stats));
      },
      release_gil);
  m.def(
      "ll_combine_pack",
      [](uintptr_t x, uintptr_t layout_range, int64_t num_max, int64_t hidden, int num_topk, int num_local_experts,
         int num_ranks, const std::vector<int32_t>& fields, const std::vector<uintptr_t>& messages) {
        const LowLatencyLayout layout = make_low_latency_layout(num_max, hidden, num_topk, num_local_experts, false);
        cpu::ll_combine_pack(as_ptr<const eplib::bf16_t>(x), as_ptr<const int64_t>(layout_range), layout, num_ranks,
                             header_fields(fields).data(), addresses<uint8_t*>(messages));
      },
      release_gil);
  m.def(
      "ll_combine_reduce",
      [](const std::vector<uintptr_t>& messages, const std::vector<uintptr_t>& pulled, int64_t num_max, int64_t hidden,
         int num_topk, int num_local_experts, uintptr_t topk_idx, uintptr_t topk_weights, int64_t num_tokens,
         int num_experts, uintptr_t send_slot, uintptr_t send_offset, uintptr_t out) {
        const LowLatencyLayout layout = make_low_latency_layout(num_max, hidden, num_topk, num_local_experts, false);
        if (pulled.size() != messages.size())
          throw std::invalid_argument("eplib: ll_combine_reduce needs one zero-copy address per message");
        cpu::ll_combine_reduce(addresses<const uint8_t*>(messages), addresses<const uint8_t*>(pulled), layout,
                               as_ptr<const int64_t>(topk_idx),
                               as_ptr<const float>(topk_weights), num_tokens, num_topk, num_experts,
                               static_cast<int>(messages.size()), as_ptr<const int32_t>(send_slot),
                               as_ptr<const int32_t>(send_offset), as_ptr<eplib::bf16_t>(out));
      },
      release_gil);
  py::class_<cpu::SharedRegion>(m, "SharedRegion",
                                "Host memory shared between the rank processes of one host (memfd); zeroed.")
      .def(py::init<int64_t>(), py::arg("num_bytes"))
      .def("handle", &cpu::SharedRegion::handle)
      .def("open_peer", &cpu::SharedRegion::open_peer, py::arg("handle"))
      .def_property_readonly("address", &cpu::SharedRegion::address)
      .def_property_readonly("num_bytes", &cpu::SharedRegion::num_bytes);
  m.def("publish_flag", [](uintptr_t flag, uint64_t value) { cpu::publish_flag(as_ptr<uint64_t>(flag), value); },
        "Release store of a uint64 flag in shared memory.");
  m.def(
      "wait_flags",
      [](const std::vector<uintptr_t>& flags, uint64_t target, double timeout_s) {
        return cpu::wait_flags(addresses<const uint64_t*>(flags), target, timeout_s);
      },
      release_gil,
      "Waits until every uint64 flag (0: none) holds >= target or timeout_s passed; per flag the nanoseconds it "
      "took, -1 if it did not arrive.");
}
}  // namespace

PYBIND11_MODULE(_C, m) {
  using eplib::DType;
  namespace cpu = eplib::cpu;
  const auto release_gil = py::call_guard<py::gil_scoped_release>();

  m.doc() = "eplib native core: CPU kernels and (when built with nvcc) CUDA kernels.";

  m.def("built_with_cuda", &built_with_cuda,
        "True when the CUDA part was compiled in (with nvcc, or as the CPU execution of the CUDA sources).");
  m.def("cuda_cpu_execution", &cuda_cpu_execution,
        "True when the CUDA sources were built to run on the CPU (EPLIB_CUDA_CPU=1): no GPU is used.");
  m.def("cuda_device_status", &cuda_device_status,
        "{device_count, error, driver_version, runtime_version, cpu_execution}: what eplib's CUDA runtime sees.");
  m.def(
      "cuda_available",
      [] { return built_with_cuda() && !cuda_cpu_execution() && cuda_device_status()["device_count"].cast<int>() > 0; },
      "True when CUDA kernels can run on a GPU here.");
  // Bits the CUDA kernels set in a device error flag (eplib/errors.h); the host raises on them.
  m.attr("ERR_EXPERT_ID") = eplib::kErrorExpertId;
  m.attr("ERR_WEIGHT") = eplib::kErrorWeight;
  m.attr("ERR_OVERFLOW") = eplib::kErrorOverflow;
  m.attr("ERR_RANK_COUNTS") = eplib::kErrorRankCounts;
  m.attr("ERR_EXPERT_COUNTS") = eplib::kErrorExpertCounts;
  m.attr("ERR_PEER_INPUT") = eplib::kErrorPeerInput;
  m.attr("ERR_LL_MESSAGE") = eplib::kErrorLowLatencyMessage;
  // The ipc transport's fixed sizes (cuda/ipc.h), known without CUDA for size hints.
  m.def("ipc_header_bytes", [] { return eplib::cuda::kIpcRegionOffset; },
        "Bytes at the head of every ipc buffer before its receive region.");
  m.attr("IPC_MAX_RANKS") = eplib::cuda::kMaxIpcRanks;
  m.attr("IPC_MAX_CHANNELS") = eplib::cuda::kMaxIpcChannels;
  m.def("ipc_buffer_bytes", &eplib::cuda::ipc_buffer_bytes, py::arg("num_ranks"), py::arg("num_channels"),
        py::arg("row_stride"), py::arg("ring_rows"),
        "Bytes of an ipc buffer (header included) whose rings hold ring_rows rows of row_stride bytes per "
        "(source, channel) stream.");
  m.attr("IPC_MAX_LOCAL_EXPERTS") = eplib::cuda::kMaxIpcLocalExperts;
  m.attr("IPC_RECORD_FORMAT_FIELDS") = eplib::cuda::kRecordFormatFields;
  {
    namespace cuda = eplib::cuda;
    py::dict phases;
    phases[py::int_(static_cast<int>(cuda::kPhaseNotify))] = "dispatch (counts exchange)";
    phases[py::int_(static_cast<int>(cuda::kPhaseDispatchSend))] = "dispatch (send: waiting for a receiver to be ready or to free ring slots)";
    phases[py::int_(static_cast<int>(cuda::kPhaseDispatchReceive))] = "dispatch (receive: waiting for a sender's rows)";
    phases[py::int_(static_cast<int>(cuda::kPhaseCombineSend))] = "combine (send: waiting for a receiver to be ready or to free ring slots)";
    phases[py::int_(static_cast<int>(cuda::kPhaseCombineReceive))] = "combine (receive: waiting for a sender's rows)";
    phases[py::int_(static_cast<int>(cuda::kPhaseBarrier))] = "destroy (barrier)";
    phases[py::int_(static_cast<int>(cuda::kPhaseLowLatencySend))] = "low-latency call (send: waiting for a receiver to free its slot)";
    phases[py::int_(static_cast<int>(cuda::kPhaseLowLatencyReceive))] = "low-latency call (receive: waiting for a sender's message)";
    m.attr("IPC_PHASES") = phases;
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
      [](uintptr_t x, int64_t x_bytes, uintptr_t x_scales, int64_t scales_bytes, int64_t scales_token_stride,
         int64_t scales_column_stride, uintptr_t topk_idx, uintptr_t topk_weights, int num_topk, int num_experts,
         uintptr_t send_pos, int64_t num_tokens, int num_ranks, uintptr_t send_buffer) {
        cpu::dispatch_pack(as_ptr<const uint8_t>(x), x_bytes, as_ptr<const uint8_t>(x_scales), scales_bytes,
                           scales_token_stride, scales_column_stride, as_ptr<const int64_t>(topk_idx), as_ptr<const float>(topk_weights), num_topk, num_experts,
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

  def_low_latency_cpu(m);
#ifdef EPLIB_WITH_CUDA
  def_cuda_kernels(m);
#endif
#ifdef EPLIB_CUDA_CPU
  def_cuda_cpu(m);
#endif

  m.def(
      "advise_huge_pages",
      [](uintptr_t address, int64_t num_bytes) { cpu::advise_huge_pages(as_ptr<void>(address), num_bytes); },
      "Back a fresh, untouched host allocation with transparent huge pages (advisory).");

  m.def(
      "dispatch_row_shifts",
      [](uintptr_t rank_prefix_matrix, int rank, int num_ranks, int64_t slot_rows, uintptr_t row_shift) {
        eplib::dispatch_row_shifts(as_ptr<const int32_t>(rank_prefix_matrix), rank, num_ranks, slot_rows,
                                   as_ptr<int64_t>(row_shift));
      },
      "ipc transport: int64 [R] row shifts of this rank's dispatch rows in each receiver's region "
      "(eplib/layout.h), the arithmetic the CUDA send kernel runs; host pointers.");
  m.def(
      "combine_row_shifts",
      [](uintptr_t rank_prefix_matrix, int rank, int num_ranks, int64_t slot_rows, uintptr_t compact_start,
         uintptr_t row_shift) {
        eplib::combine_row_shifts(as_ptr<const int32_t>(rank_prefix_matrix), rank, num_ranks, slot_rows,
                                  as_ptr<const int64_t>(compact_start), as_ptr<int64_t>(row_shift));
      },
      "ipc transport: int64 [R] row shifts of the combine rows this rank sends back to each source.");
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
