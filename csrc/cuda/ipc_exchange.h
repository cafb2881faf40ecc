// The ipc transport's exchanges (ipc.h): one cooperative kernel per dispatch or combine, rows streaming
// through the rings of the peers' buffers. IpcBuffer::dispatch / combine call these.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "ipc.h"
#include "kernels.h"

namespace eplib::cuda {

// One dispatch round: token rows (pack) into the destinations' rings, the own rings into the outputs
// (unpack; its recv_buffer is not used). exchange.channel_counts, when given, gets the rows each
// (source, channel) stream brought: the combine on this dispatch's handle needs them.
void ipc_dispatch(const IpcView& view, const DispatchPackArgs& pack, const DispatchUnpackArgs& unpack,
                  const IpcExchangeArgs& exchange, cudaStream_t stream);

// One combine round: expert outputs back through the channels their tokens came by, reduced per token
// (reduce; its recv_buffer is not used). exchange.channel_counts: those of the dispatch.
void ipc_combine(const IpcView& view, const CombinePackArgs& pack, const CombineReduceArgs& reduce,
                 const IpcExchangeArgs& exchange, cudaStream_t stream);

// A rejected participant's round (ipc.h "Rejected rounds"): the dispatch (combine: false) or combine
// kernel with no rows and no outputs; only exchange.num_channels must match the peers' call.
void ipc_join_rejected(const IpcView& view, bool combine, const IpcExchangeArgs& exchange, cudaStream_t stream);

}  // namespace eplib::cuda
