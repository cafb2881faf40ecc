"""The CUDA kernels of eplib._C against the CPU kernels, bit for bit.

Every CUDA kernel runs on the same inputs as its CPU twin and the outputs must be byte-equal:
random and integer-coded payloads, masked slots, empty ranks and experts, and the inputs only the
device can check (bad expert ids, slot and num_out_rows overflow), whose CPU expectation is the
CPU result on sanitised inputs plus the error bit. Each test runs on a GPU (marker `gpu`) and on the
CPU execution of the CUDA sources (marker `cuda_cpu`: eplib built with EPLIB_CUDA_CPU=1), through the
``dev`` fixture. The first test runs anywhere: a CUDA build must really contain the CUDA functions.
"""

import pytest
import torch

import eplib
from eplib import _C
from eplib._dtypes import KERNEL_DTYPE_CODES
from eplib.transports.tensors import as_bytes, ptr, row_bytes, scale_strides
from gpu_harness import gpu_usable
from test_kernels import native_layout as cpu_layout

CUDA_FUNCTIONS = ["cuda_dispatch_layout", "cuda_send_positions", "cuda_check_dispatch_inputs", "cuda_dispatch_pack",
                  "cuda_dispatch_unpack", "cuda_combine_pack", "cuda_combine_reduce", "cuda_permute_layout",
                  "cuda_permute_rows", "cuda_unpermute_rows"]


def test_cuda_functions_exist_when_built_with_cuda():
    assert (_C.ERR_EXPERT_ID, _C.ERR_WEIGHT, _C.ERR_OVERFLOW) == (1, 2, 4)
    if not _C.built_with_cuda():
        pytest.skip("eplib built without CUDA")
    missing = [name for name in CUDA_FUNCTIONS if not hasattr(_C, name)]
    assert not missing


GPU_USABLE = gpu_usable()


def gpu_test(test):
    """Marks a test `gpu` and skips it where eplib cannot run CUDA tensors (gpu_harness.gpu_usable)."""
    return pytest.mark.gpu(pytest.mark.skipif(not GPU_USABLE, reason="needs a CUDA device")(test))


class KernelDevice:
    """Where a test's CUDA kernels run: a GPU ("gpu": CUDA tensors, torch's current stream) or the CPU
    execution of the CUDA sources ("cuda_cpu": CPU tensors, a stream of the emulated device)."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._stream = None
        # Copies made by put(), alive until the next synchronize(): kernels read them asynchronously
        # (on a GPU, torch's caching allocator gives the same guarantee through stream order).
        self._held = []

    @property
    def stream(self) -> int:
        if self.kind == "gpu":
            return torch.cuda.current_stream().cuda_stream
        if self._stream is None:
            self._stream = _C.cuda_cpu_stream_create()
        return self._stream

    @property
    def index(self) -> int:
        return torch.cuda.current_device() if self.kind == "gpu" else 0

    @property
    def torch_device(self) -> torch.device:
        return torch.device("cuda") if self.kind == "gpu" else torch.device("cpu")

    def put(self, tensor):
        """A copy of a CPU tensor on the device (None stays None)."""
        if tensor is None:
            return None
        if self.kind == "gpu":
            return tensor.cuda()
        copy = tensor.clone()
        self._held.append(copy)
        return copy

    def synchronize(self) -> None:
        if self.kind == "gpu":
            torch.cuda.synchronize()
        else:
            _C.cuda_cpu_stream_synchronize(self.stream)
            self._held.clear()

    def launch(self, kernel, **fields) -> None:
        """_C.cuda_<kernel>(_C.<Args>(**fields)) on this device's stream."""
        args_class = getattr(_C, "".join(part.capitalize() for part in kernel.split("_")) + "Args")
        getattr(_C, "cuda_" + kernel)(args_class(**fields), self.index, self.stream)


@pytest.fixture(params=[pytest.param("gpu", marks=pytest.mark.gpu), pytest.param("cuda_cpu", marks=pytest.mark.cuda_cpu)])
def dev(request) -> KernelDevice:
    if request.param == "gpu" and not GPU_USABLE:
        pytest.skip("needs a CUDA device")
    device = KernelDevice(request.param)
    yield device
    device.synchronize()
    if device._stream is not None:
        _C.cuda_cpu_stream_destroy(device._stream)


DTYPES = [torch.float32, torch.bfloat16]


def new_flag(dev: KernelDevice) -> torch.Tensor:
    return dev.put(torch.zeros(1, dtype=torch.int32))


def flag_bits(dev: KernelDevice, flag: torch.Tensor) -> int:
    dev.synchronize()
    return int(flag.item())


def assert_same(got: torch.Tensor, want: torch.Tensor, what: str) -> None:
    got = got.cpu()
    assert got.dtype == want.dtype and got.shape == want.shape, f"{what}: {got.dtype}{list(got.shape)}"
    same = as_bytes(got) == as_bytes(want)
    assert bool(same.all()), f"{what}: first differing byte {same.logical_not().nonzero()[0].item()}"


def random_topk_idx(num_tokens, num_topk, num_experts, seed, masked=0.3):
    generator = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, num_experts, (num_tokens, num_topk), generator=generator)
    idx[torch.rand(num_tokens, num_topk, generator=generator) < masked] = -1
    return idx


def random_rows(num_rows, hidden, dtype, seed, integer=False):
    generator = torch.Generator().manual_seed(seed)
    if integer:
        return torch.randint(-8, 9, (num_rows, hidden), generator=generator).to(dtype)
    return (torch.randn(num_rows, hidden, generator=generator) * 10).to(dtype)


# ----------------------------------------------------------------------------------- layout

def cuda_layout(dev, idx, num_experts, num_ranks, flag):
    idx = dev.put(idx)
    per_rank = dev.put(torch.empty(num_ranks, dtype=torch.int32))
    per_expert = dev.put(torch.empty(num_experts, dtype=torch.int32))
    in_rank = dev.put(torch.empty(idx.shape[0], num_ranks, dtype=torch.bool))
    dev.launch("dispatch_layout", topk_idx=idx.data_ptr(), num_tokens=idx.shape[0], num_topk=idx.shape[1],
               num_experts=num_experts, num_ranks=num_ranks, num_tokens_per_rank=per_rank.data_ptr(),
               num_tokens_per_expert=per_expert.data_ptr(), is_token_in_rank=in_rank.data_ptr(),
               error_flag=flag.data_ptr())
    return per_rank, per_expert, in_rank


@pytest.mark.parametrize("num_tokens,num_topk,num_experts,num_ranks",
                         [(0, 4, 8, 2), (1, 8, 256, 8), (4096, 8, 256, 8), (5000, 3, 6, 3), (77, 9, 9, 9)])
@pytest.mark.parametrize("bad_ids", [False, True], ids=["valid", "bad_ids"])
def test_layout(dev, num_tokens, num_topk, num_experts, num_ranks, bad_ids):
    idx = random_topk_idx(num_tokens, num_topk, num_experts, seed=num_tokens)
    if bad_ids and num_tokens:
        idx[num_tokens // 2, 0], idx[-1, -1] = num_experts, -5
    flag = new_flag(dev)
    got = cuda_layout(dev, idx, num_experts, num_ranks, flag)
    want = cpu_layout(torch.where((idx >= -1) & (idx < num_experts), idx, -1), num_experts, num_ranks)
    assert flag_bits(dev, flag) == (_C.ERR_EXPERT_ID if bad_ids and num_tokens else 0)
    for name, g, w in zip(("per_rank", "per_expert", "is_token_in_rank"), got, want):
        assert_same(g, w, name)


def cpu_send_positions(in_rank):
    send_pos = torch.empty(in_rank.shape, dtype=torch.int32)
    counts = torch.empty(in_rank.shape[1], dtype=torch.int32)
    _C.send_positions(in_rank.data_ptr(), in_rank.shape[0], in_rank.shape[1], send_pos.data_ptr(), counts.data_ptr())
    return send_pos, counts


def cuda_send_positions(dev, in_rank, slot_rows, flag):
    in_rank = dev.put(in_rank)
    send_pos = dev.put(torch.empty(in_rank.shape, dtype=torch.int32))
    counts = dev.put(torch.empty(in_rank.shape[1], dtype=torch.int32))
    dev.launch("send_positions", is_token_in_rank=in_rank.data_ptr(), num_tokens=in_rank.shape[0],
               num_ranks=in_rank.shape[1], slot_rows=slot_rows, send_pos=send_pos.data_ptr(),
               num_tokens_per_rank=counts.data_ptr(), error_flag=flag.data_ptr())
    return send_pos, counts


@pytest.mark.parametrize("num_tokens", [0, 5, 2048, 4097, 9000])
@pytest.mark.parametrize("slot_rows", [0, 3000, 700], ids=["contiguous", "slots", "slot_overflow"])
def test_send_positions(dev, num_tokens, slot_rows):
    num_ranks = 5
    generator = torch.Generator().manual_seed(num_tokens)
    in_rank = torch.rand(num_tokens, num_ranks, generator=generator) < torch.tensor([0.4, 0.0, 0.9, 0.1, 0.5])
    want_pos, want_counts = cpu_send_positions(in_rank)
    if slot_rows:
        # Index within the rank's region, moved to the rank's slot; -1 beyond the slot.
        starts = torch.cat([torch.zeros(1, dtype=torch.int32), want_counts.cumsum(0)[:-1].to(torch.int32)])
        index = want_pos - starts
        slot = torch.arange(num_ranks, dtype=torch.int32) * slot_rows + index
        want_pos = torch.where((want_pos >= 0) & (index < slot_rows), slot, -1).to(torch.int32)
    flag = new_flag(dev)
    got_pos, got_counts = cuda_send_positions(dev, in_rank, slot_rows, flag)
    overflow = slot_rows > 0 and int(want_counts.max()) > slot_rows
    assert flag_bits(dev, flag) == (_C.ERR_OVERFLOW if overflow else 0)
    assert_same(got_pos, want_pos, "send_pos")
    # The rows placed for each rank: at most slot_rows in the slot layout.
    assert_same(got_counts, want_counts.clamp(max=slot_rows) if slot_rows else want_counts, "num_tokens_per_rank")


# ----------------------------------------------------------------------------------- dispatch

def make_dispatch_case(num_tokens, hidden, dtype, num_topk, num_experts, num_ranks, seed, fp8):
    idx = random_topk_idx(num_tokens, num_topk, num_experts, seed)
    weights = torch.rand(num_tokens, num_topk, generator=torch.Generator().manual_seed(seed))
    if fp8:
        x = random_rows(num_tokens, hidden, torch.float32, seed, integer=True).to(torch.float8_e4m3fn)
        scales = torch.rand(num_tokens, hidden // 128, generator=torch.Generator().manual_seed(seed + 1))
    else:
        x, scales = random_rows(num_tokens, hidden, dtype, seed), None
    return x, scales, idx, weights


def cpu_pack(x, scales, idx, weights, num_experts, send_pos, num_rows, stride):
    buffer = torch.zeros(num_rows * stride, dtype=torch.uint8)
    _C.dispatch_pack(x.data_ptr(), row_bytes(x), ptr(scales), row_bytes(scales), *scale_strides(scales), ptr(idx),
                     ptr(weights),
                     idx.shape[1] if idx is not None else 0, num_experts, send_pos.data_ptr(), x.shape[0],
                     send_pos.shape[1], buffer.data_ptr())
    return buffer


def cuda_pack(dev, x, scales, idx, weights, num_experts, send_pos, num_rows, stride, flag):
    x_, scales_, idx_, weights_, send_pos_ = (dev.put(t) for t in (x, scales, idx, weights, send_pos))
    buffer = dev.put(torch.zeros(num_rows * stride, dtype=torch.uint8))
    dev.launch("dispatch_pack", x=x_.data_ptr(), x_bytes=row_bytes(x), x_scales=ptr(scales_),
               scales_bytes=row_bytes(scales), scales_token_stride=scale_strides(scales_)[0],
               scales_column_stride=scale_strides(scales_)[1], topk_idx=ptr(idx_), topk_weights=ptr(weights_),
               num_topk=idx.shape[1] if idx is not None else 0, num_experts=num_experts,
               send_pos=send_pos_.data_ptr(), num_tokens=x.shape[0], num_ranks=send_pos.shape[1],
               send_buffer=buffer.data_ptr(), error_flag=flag.data_ptr())
    return buffer


PACK_CASES = {
    "fp32": dict(hidden=64, dtype=torch.float32, fp8=False),
    "bf16_deepep_hidden": dict(hidden=7168, dtype=torch.bfloat16, fp8=False),
    "bf16_odd_hidden": dict(hidden=33, dtype=torch.bfloat16, fp8=False),  # 66-byte rows: scalar tail
    "fp8_tuple": dict(hidden=256, dtype=None, fp8=True),
    # 129-byte rows: row t starts at every alignment in turn (16/8/4/1-byte copy paths and tails).
    "fp8_odd_row_bytes": dict(hidden=129, dtype=None, fp8=True),
}


@pytest.mark.parametrize("with_topk", [True, False], ids=["topk", "x_only"])
@pytest.mark.parametrize("name", list(PACK_CASES))
def test_dispatch_pack_and_unpack(dev, name, with_topk):
    case = PACK_CASES[name]
    num_tokens, num_topk, num_experts, num_ranks = 300, 4, 16, 4
    x, scales, idx, weights = make_dispatch_case(num_tokens, case["hidden"], case["dtype"], num_topk, num_experts,
                                                 num_ranks, 7, case["fp8"])
    _, _, in_rank = cpu_layout(idx, num_experts, num_ranks)
    send_pos, counts = cpu_send_positions(in_rank)
    num_rows = int(counts.sum())
    topk = (idx, weights) if with_topk else (None, None)
    stride = _C.dispatch_row_stride(row_bytes(x), row_bytes(scales), num_topk if with_topk else 0)
    flag = new_flag(dev)
    want = cpu_pack(x, scales, *topk, num_experts, send_pos, num_rows, stride)
    got = cuda_pack(dev, x, scales, *topk, num_experts, send_pos, num_rows, stride, flag)
    assert flag_bits(dev, flag) == 0
    assert_same(got, want, "send buffer")

    # Unpack everything as one receiver of the R regions, in both layouts, with padding rows.
    k = num_topk if with_topk else 0
    experts_per_rank = num_experts // num_ranks
    want_out = cpu_unpack(want, num_rows, x, scales, k, experts_per_rank)
    slot_rows = int(counts.max()) + 3
    slotted = torch.zeros(num_ranks * slot_rows * stride, dtype=torch.uint8)
    starts = [0] + counts.cumsum(0).tolist()
    for s in range(num_ranks):
        slotted[s * slot_rows * stride:(s * slot_rows + int(counts[s])) * stride] = want[starts[s] * stride:
                                                                                         starts[s + 1] * stride]
    for buffer, slots in ((want, 0), (slotted, slot_rows)):
        for num_out_rows in (num_rows + 5, num_rows - 7):
            flag = new_flag(dev)
            got_out = cuda_unpack(dev, buffer, counts, slots, num_out_rows, x, scales, k, experts_per_rank, flag)
            bits = flag_bits(dev, flag)
            kept = min(num_rows, num_out_rows)
            for what, g, w, fill in zip(("x", "scales", "src_idx", "topk_idx", "topk_weights"), got_out, want_out,
                                        (0, 0, -1, -1, 0)):
                if w is None:
                    continue
                assert_same(g[:kept], w[:kept], f"recv {what} (slot_rows={slots}, rows={num_out_rows})")
                assert bool((g[kept:].cpu().view(torch.uint8 if fill == 0 else g.dtype) == fill).all())
            got_per_expert, got_num_out = got_out[5], got_out[6]
            assert int(got_num_out.item()) == kept
            if with_topk and num_out_rows >= num_rows:
                assert_same(got_per_expert, want_out[5], "num_recv_tokens_per_expert")
            assert bits == (_C.ERR_OVERFLOW if num_out_rows < num_rows else 0)


# FP8 scales in the forms DeepEP accepts besides row-major float32: each is read through its strides.
SCALE_FORMS = {
    "column_major": lambda scales: scales.T.contiguous().T,  # what DeepEP's intranode test passes
    "int32_ue8m0": lambda scales: scales.view(torch.int32),
    "int32_column_major": lambda scales: scales.view(torch.int32).T.contiguous().T,
}


@pytest.mark.parametrize("form", list(SCALE_FORMS))
def test_dispatch_pack_reads_scales_through_strides(dev, form):
    """Strided and int32 scales pack to the bytes of their row-major copy, on the CPU and CUDA kernels."""
    num_tokens, num_topk, num_experts, num_ranks = 70, 2, 8, 4
    x, scales, idx, weights = make_dispatch_case(num_tokens, 512, None, num_topk, num_experts, num_ranks, 3, True)
    given = SCALE_FORMS[form](scales)
    assert given.shape == scales.shape
    row_major = given.contiguous()
    _, _, in_rank = cpu_layout(idx, num_experts, num_ranks)
    send_pos, counts = cpu_send_positions(in_rank)
    num_rows = int(counts.sum())
    stride = _C.dispatch_row_stride(row_bytes(x), row_bytes(given), num_topk)
    want = cpu_pack(x, row_major, idx, weights, num_experts, send_pos, num_rows, stride)
    assert_same(cpu_pack(x, given, idx, weights, num_experts, send_pos, num_rows, stride), want, "cpu send buffer")
    assert dev.put(given).stride() == given.stride()  # the device copy keeps the form
    flag = new_flag(dev)
    got = cuda_pack(dev, x, given, idx, weights, num_experts, send_pos, num_rows, stride, flag)
    assert flag_bits(dev, flag) == 0
    assert_same(got, want, "cuda send buffer")


def cpu_unpack(buffer, num_rows, x, scales, num_topk, num_local_experts):
    recv_x = torch.empty((num_rows,) + tuple(x.shape[1:]), dtype=x.dtype)
    recv_scales = torch.empty(num_rows, scales.shape[1]) if scales is not None else None
    src = torch.empty(num_rows, dtype=torch.int32)
    idx = torch.empty(num_rows, num_topk, dtype=torch.int64) if num_topk else None
    weights = torch.empty(num_rows, num_topk) if num_topk else None
    per_expert = torch.empty(num_local_experts, dtype=torch.int64) if num_topk else None
    _C.dispatch_unpack(buffer.data_ptr(), num_rows, row_bytes(x), row_bytes(scales), num_topk, num_local_experts,
                       recv_x.data_ptr(), ptr(recv_scales), src.data_ptr(), ptr(idx), ptr(weights), ptr(per_expert))
    return recv_x, recv_scales, src, idx, weights, per_expert


def cuda_unpack(dev, buffer, counts, slot_rows, num_out_rows, x, scales, num_topk, num_local_experts, flag):
    # Filled with a pattern (byte 5) that every written row must overwrite.
    recv_x = dev.put(torch.full((num_out_rows, row_bytes(x)), 5, dtype=torch.uint8)).view(x.dtype)
    recv_scales = dev.put(torch.full((num_out_rows, scales.shape[1]), 5.0)) if scales is not None else None
    src = dev.put(torch.full((num_out_rows,), 5, dtype=torch.int32))
    idx = dev.put(torch.full((num_out_rows, num_topk), 5, dtype=torch.int64)) if num_topk else None
    weights = dev.put(torch.full((num_out_rows, num_topk), 5.0)) if num_topk else None
    per_expert = dev.put(torch.full((num_local_experts,), 5, dtype=torch.int64)) if num_topk else None
    num_out = dev.put(torch.zeros(1, dtype=torch.int32))
    counts_, buffer_ = dev.put(counts.to(torch.int32)), dev.put(buffer)
    dev.launch("dispatch_unpack", recv_buffer=buffer_.data_ptr(), recv_counts=counts_.data_ptr(),
               num_ranks=counts.shape[0], slot_rows=slot_rows, num_out_rows=num_out_rows, x_bytes=row_bytes(x),
               scales_bytes=row_bytes(scales), num_topk=num_topk, num_local_experts=num_local_experts,
               recv_x=recv_x.data_ptr(), recv_x_scales=ptr(recv_scales), recv_src_idx=src.data_ptr(),
               recv_topk_idx=ptr(idx), recv_topk_weights=ptr(weights), num_recv_tokens_per_expert=ptr(per_expert),
               num_recv_out=num_out.data_ptr(), error_flag=flag.data_ptr())
    return recv_x, recv_scales, src, idx, weights, per_expert, num_out


def test_dispatch_pack_flags_bad_ids_and_weights(dev):
    num_tokens, num_topk, num_experts, num_ranks = 50, 3, 8, 2
    x, _, idx, weights = make_dispatch_case(num_tokens, 16, torch.float32, num_topk, num_experts, num_ranks, 3, False)
    bad_idx = idx.clone()
    bad_idx[4, 1], bad_idx[9, 0] = num_experts + 3, -7
    clean_idx = torch.where((bad_idx >= -1) & (bad_idx < num_experts), bad_idx, -1)
    _, _, in_rank = cpu_layout(clean_idx, num_experts, num_ranks)
    send_pos, counts = cpu_send_positions(in_rank)
    stride = _C.dispatch_row_stride(64, 0, num_topk)
    flag = new_flag(dev)
    got = cuda_pack(dev, x, None, bad_idx, weights, num_experts, send_pos, int(counts.sum()), stride, flag)
    assert flag_bits(dev, flag) == _C.ERR_EXPERT_ID
    assert_same(got, cpu_pack(x, None, clean_idx, weights, num_experts, send_pos, int(counts.sum()), stride),
                "send buffer (bad ids travel as -1)")
    bad_weights = weights.clone()
    bad_weights[2, 2] = float("inf")
    flag = new_flag(dev)
    cuda_pack(dev, x, None, clean_idx, bad_weights, num_experts, send_pos, int(counts.sum()), stride, flag)
    assert flag_bits(dev, flag) == _C.ERR_WEIGHT


# ----------------------------------------------------------------------------------- combine

@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("hidden,num_topk", [(7168, 8), (40, 0), (33, 3)])
def test_combine_pack_and_reduce(dev, dtype, hidden, num_topk):
    num_tokens, num_ranks = 257, 4
    generator = torch.Generator().manual_seed(hidden)
    in_rank = torch.rand(num_tokens, num_ranks, generator=generator) < 0.5
    send_pos, counts = cpu_send_positions(in_rank)
    num_rows = int(counts.sum())
    x = random_rows(num_rows, hidden, dtype, 1)
    weights = torch.rand(num_rows, num_topk, generator=generator)
    x_bytes = hidden * x.element_size()
    stride = _C.combine_row_stride(x_bytes, num_topk)
    if num_topk:
        want = torch.zeros(num_rows * stride, dtype=torch.uint8)
        _C.combine_pack(x.data_ptr(), x_bytes, weights.data_ptr(), num_topk, num_rows, want.data_ptr())
    else:
        want = as_bytes(x).clone()
    # Contiguous layout: the rows in place. Slot layout: source s's rows at s * slot_rows.
    counts_ = dev.put(counts)
    x_, weights_ = dev.put(x), dev.put(weights)
    slot_rows = int(counts.max()) + 2
    for slots in (0, slot_rows):
        rows = num_ranks * slots if slots else num_rows
        got = dev.put(torch.zeros(rows * stride, dtype=torch.uint8))
        dev.launch("combine_pack", x=x_.data_ptr(), x_bytes=x_bytes, topk_weights=ptr(weights_) if num_topk else 0,
                   num_topk=num_topk, recv_counts=counts_.data_ptr(), num_ranks=num_ranks, slot_rows=slots,
                   num_rows=num_rows, send_buffer=got.data_ptr())
        dev.synchronize()
        if slots:
            starts = [0] + counts.cumsum(0).tolist()
            regions = got.cpu().view(num_ranks, slots * stride)
            for s in range(num_ranks):
                assert_same(regions[s, :int(counts[s]) * stride], want[starts[s] * stride:starts[s + 1] * stride],
                            f"combine slot of source {s}")
        else:
            assert_same(got, want, "combine send buffer")

    biases = [random_rows(num_tokens, hidden, dtype, seed) for seed in (2, 3)]
    for bias_0, bias_1 in ((None, None), (biases[0], None), (biases[0], biases[1])):
        out = torch.empty(num_tokens, hidden, dtype=dtype)
        out_w = torch.empty(num_tokens, num_topk) if num_topk else None
        _C.combine_reduce(KERNEL_DTYPE_CODES[dtype], want.data_ptr(), hidden, num_topk, send_pos.data_ptr(),
                          num_tokens, num_ranks, ptr(bias_0), ptr(bias_1), out.data_ptr(), ptr(out_w))
        on = [dev.put(t) for t in (want, send_pos, bias_0, bias_1)]
        got = dev.put(torch.empty(num_tokens, hidden, dtype=dtype))
        got_w = dev.put(torch.empty(num_tokens, num_topk)) if num_topk else None
        dev.launch("combine_reduce", dtype=KERNEL_DTYPE_CODES[dtype], recv_buffer=on[0].data_ptr(), hidden=hidden,
                   num_topk=num_topk, send_pos=on[1].data_ptr(), num_tokens=num_tokens, num_ranks=num_ranks,
                   bias_0=ptr(on[2]), bias_1=ptr(on[3]), combined_x=got.data_ptr(), combined_topk_weights=ptr(got_w))
        dev.synchronize()
        assert_same(got, out, "combined_x")
        if num_topk:
            assert_same(got_w, out_w, "combined_topk_weights")


# ----------------------------------------------------------------------------------- permutation

def cpu_permute_layout(idx, num_local_experts, alignment, num_out_rows=0):
    pair_pos = torch.empty(idx.shape, dtype=torch.int32)
    offsets = torch.empty(num_local_experts + 1, dtype=torch.int64)
    counts = torch.empty(num_local_experts, dtype=torch.int64)
    _C.permute_layout(idx.data_ptr(), idx.shape[0], idx.shape[1], num_local_experts, alignment, num_out_rows,
                      pair_pos.data_ptr(), offsets.data_ptr(), counts.data_ptr())
    return pair_pos, offsets, counts


def cuda_permute_layout(dev, idx, num_local_experts, alignment, num_out_rows, flag):
    idx = dev.put(idx)
    pair_pos = dev.put(torch.empty(idx.shape, dtype=torch.int32))
    offsets = dev.put(torch.empty(num_local_experts + 1, dtype=torch.int64))
    counts = dev.put(torch.empty(num_local_experts, dtype=torch.int64))
    dev.launch("permute_layout", topk_idx=idx.data_ptr(), num_rows=idx.shape[0], num_topk=idx.shape[1],
               num_local_experts=num_local_experts, expert_alignment=alignment, num_out_rows=num_out_rows,
               pair_pos=pair_pos.data_ptr(), expert_offsets=offsets.data_ptr(),
               num_tokens_per_expert=counts.data_ptr(), error_flag=flag.data_ptr())
    dev.synchronize()
    return pair_pos, offsets, counts


@pytest.mark.parametrize("num_rows,num_topk,num_local_experts,alignment",
                         [(0, 2, 4, 1), (1, 1, 1, 1), (4096, 8, 256, 128), (300, 4, 32, 16), (1000, 6, 5000, 1),
                          # shared counters right at the 48 KiB launch limit; K > 32 (tiles span rows);
                          # the most local experts (a single ranking warp)
                          (2000, 8, 512, 4), (100, 40, 3, 2), (300, 4, 12000, 2)])
@pytest.mark.parametrize("variant", ["valid", "bad_ids", "overflow"])
def test_permute_layout(dev, num_rows, num_topk, num_local_experts, alignment, variant):
    idx = random_topk_idx(num_rows, num_topk, num_local_experts, seed=num_rows + 1)
    if variant == "bad_ids" and num_rows:
        idx[num_rows // 3, 0], idx[-1, -1] = num_local_experts, -2
    clean_idx = torch.where((idx >= -1) & (idx < num_local_experts), idx, -1)
    want_pos, want_offsets, want_counts = cpu_permute_layout(clean_idx, num_local_experts, alignment)
    total = int(want_offsets[-1])
    num_out_rows = max(1, total * 2 // 3) if variant == "overflow" else 0
    expected_bits = {"valid": 0, "bad_ids": _C.ERR_EXPERT_ID if num_rows else 0,
                     "overflow": _C.ERR_OVERFLOW if total > num_out_rows else 0}[variant]
    if num_out_rows:
        want_pos = torch.where(want_pos >= num_out_rows, -1, want_pos).to(torch.int32)
    flag = new_flag(dev)
    got = cuda_permute_layout(dev, idx, num_local_experts, alignment, num_out_rows, flag)
    for name, g, w in zip(("pair_pos", "expert_offsets", "num_tokens_per_expert"), got,
                          (want_pos, want_offsets, want_counts)):
        assert_same(g, w, name)
    assert flag_bits(dev, flag) == expected_bits


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("hidden", [7168, 36, 33])
@pytest.mark.parametrize("weighted", [False, True], ids=["unweighted", "weighted"])
@pytest.mark.parametrize("integer", [False, True], ids=["random", "integer"])
def test_permute_and_unpermute_rows(dev, dtype, hidden, weighted, integer):
    num_rows, num_topk, num_local_experts, alignment = 200, 4, 8, 8
    idx = random_topk_idx(num_rows, num_topk, num_local_experts, seed=hidden)
    pair_pos, offsets, counts = cpu_permute_layout(idx, num_local_experts, alignment)
    num_out_rows = int(offsets[-1]) + 9  # a fixed-size output: 9 tail rows of padding too
    x = random_rows(num_rows, hidden, dtype, 1, integer)
    weights = torch.rand(num_rows, num_topk, generator=torch.Generator().manual_seed(2)) if weighted else None
    code = KERNEL_DTYPE_CODES[dtype]
    want = torch.empty(num_out_rows, hidden, dtype=dtype)
    _C.permute_rows(code, x.data_ptr(), num_rows, hidden, num_topk, pair_pos.data_ptr(), ptr(weights),
                    offsets.data_ptr(), counts.data_ptr(), num_local_experts, num_out_rows, want.data_ptr())
    on = {name: dev.put(t)
          for name, t in dict(x=x, pair_pos=pair_pos, weights=weights, offsets=offsets, counts=counts).items()}
    got = dev.put(torch.full((num_out_rows, hidden), 7.0, dtype=dtype))  # padding must be overwritten
    dev.launch("permute_rows", dtype=code, x=on["x"].data_ptr(), num_rows=num_rows, hidden=hidden, num_topk=num_topk,
               pair_pos=on["pair_pos"].data_ptr(), topk_weights=ptr(on["weights"]),
               expert_offsets=on["offsets"].data_ptr(), num_tokens_per_expert=on["counts"].data_ptr(),
               num_local_experts=num_local_experts, num_out_rows=num_out_rows, out=got.data_ptr())
    dev.synchronize()
    assert_same(got, want, "permuted rows")

    y = random_rows(num_out_rows, hidden, dtype, 3, integer)
    want_y = torch.empty(num_rows, hidden, dtype=dtype)
    _C.unpermute_rows(code, y.data_ptr(), num_out_rows, hidden, num_topk, pair_pos.data_ptr(), ptr(weights), num_rows,
                      want_y.data_ptr())
    got_y = dev.put(torch.empty(num_rows, hidden, dtype=dtype))
    y_ = dev.put(y)
    dev.launch("unpermute_rows", dtype=code, y=y_.data_ptr(), num_in_rows=num_out_rows, hidden=hidden,
               num_topk=num_topk, pair_pos=on["pair_pos"].data_ptr(), topk_weights=ptr(on["weights"]),
               num_rows=num_rows, out=got_y.data_ptr())
    dev.synchronize()
    assert_same(got_y, want_y, "unpermuted rows")


@gpu_test
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_permute_by_expert_on_cuda_equals_cpu_with_gradients(dtype):
    idx = random_topk_idx(64, 3, 6, seed=9)
    x = random_rows(64, 128, dtype, 4)
    weights = torch.rand(64, 3, generator=torch.Generator().manual_seed(5))
    results = {}
    for device in ("cpu", "cuda"):
        x_ = x.to(device).requires_grad_()
        w_ = weights.to(device).requires_grad_()
        permuted, counts, handle = eplib.permute_by_expert(x_, idx.to(device), 6, expert_alignment=4)
        out = eplib.unpermute_by_expert(permuted * 2, handle, w_)
        out.backward(torch.ones_like(out))
        results[device] = (permuted.detach(), counts, handle.pair_pos, out.detach(), x_.grad, w_.grad)
    for name, got, want in zip(("permuted", "counts", "pair_pos", "out", "grad_x", "grad_w"), results["cuda"],
                               results["cpu"]):
        if name == "grad_w":  # a torch reduction: summation order may differ between devices
            torch.testing.assert_close(got.cpu(), want)
        else:
            assert_same(got, want, name)


@gpu_test
def test_permute_by_expert_on_cuda_fixed_rows_flags_without_waiting():
    idx = torch.tensor([[0, 1], [1, 1], [5, -1]], device="cuda")
    permuted, _, handle = eplib.permute_by_expert(torch.ones(3, 8, device="cuda"), idx, 2, expert_alignment=2,
                                                  num_out_rows=3)
    assert permuted.shape == (3, 8) and handle.error_flag is not None
    with pytest.raises(ValueError, match="topk_idx"):
        eplib.permute.check_permute_errors(handle)
    with pytest.raises(ValueError, match="topk_idx"):  # num_out_rows=0: raised at the host read
        eplib.permute_by_expert(torch.ones(3, 8, device="cuda"), idx, 2)


def test_permute_layout_flags_padding_past_num_out_rows(dev):
    # Three pairs of expert 0 fit in 3 rows, but the aligned block needs 4: the CPU kernel raises.
    idx = torch.zeros(3, 1, dtype=torch.int64)
    with pytest.raises(ValueError, match="num_out_rows"):
        cpu_permute_layout(idx, 1, 4, num_out_rows=3)
    flag = new_flag(dev)
    pair_pos, offsets, counts = cuda_permute_layout(dev, idx, 1, 4, 3, flag)
    assert flag_bits(dev, flag) == _C.ERR_OVERFLOW
    assert pair_pos.cpu().reshape(-1).tolist() == [0, 1, 2] and offsets.cpu().tolist() == [0, 4]


def test_dispatch_unpack_clips_slots_with_many_experts_and_wide_topk(dev):
    # K = 40 > 32 lanes; 20000 local experts: more counters than fit in shared memory next to the
    # source table (the kernel then counts in global memory); slots smaller than the largest count.
    num_tokens, num_topk, num_experts, num_ranks = 400, 40, 40000, 2
    x, _, idx, weights = make_dispatch_case(num_tokens, 24, torch.float32, num_topk, num_experts, num_ranks, 11, False)
    _, _, in_rank = cpu_layout(idx, num_experts, num_ranks)
    send_pos, counts = cpu_send_positions(in_rank)
    num_rows = int(counts.sum())
    stride = _C.dispatch_row_stride(row_bytes(x), 0, num_topk)
    packed = cpu_pack(x, None, idx, weights, num_experts, send_pos, num_rows, stride)
    local = num_experts // num_ranks
    flat = cpu_unpack(packed, num_rows, x, None, num_topk, local)
    slot_rows = int(counts.max()) - 5
    starts = [0] + counts.cumsum(0).tolist()
    slotted = torch.zeros(num_ranks * slot_rows * stride, dtype=torch.uint8)
    keep = []
    for s in range(num_ranks):
        rows = min(int(counts[s]), slot_rows)
        slotted[s * slot_rows * stride:(s * slot_rows + rows) * stride] = packed[starts[s] * stride:
                                                                                (starts[s] + rows) * stride]
        keep += range(starts[s], starts[s] + rows)
    keep = torch.tensor(keep, dtype=torch.int64)
    kept = keep.numel()
    flag = new_flag(dev)
    got = cuda_unpack(dev, slotted, counts, slot_rows, kept + 3, x, None, num_topk, local, flag)
    bits = flag_bits(dev, flag)
    for what, g, w in zip(("x", "scales", "src_idx", "topk_idx", "topk_weights"), got, flat):
        if w is not None:
            assert_same(g[:kept], w[keep], f"recv {what}")
    assert bool((got[2][kept:].cpu() == -1).all()) and bool((got[3][kept:].cpu() == -1).all())
    kept_ids = flat[3][keep]
    want_per_expert = torch.bincount(kept_ids[kept_ids >= 0], minlength=local)
    assert_same(got[5], want_per_expert, "num_recv_tokens_per_expert")
    assert int(got[6].item()) == kept
    assert bits == _C.ERR_OVERFLOW


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_empty_inputs_launch_nothing_invalid(dev, dtype):
    # Zero tokens / rows: no grid of 0 blocks, outputs that exist are still written.
    flag = new_flag(dev)
    empty_idx = torch.empty(0, 4, dtype=torch.int64)
    per_rank, per_expert, _ = cuda_layout(dev, empty_idx, 8, 2, flag)
    send_pos, counts = cuda_send_positions(dev, torch.empty(0, 2, dtype=torch.bool), 4, flag)
    dev.synchronize()
    assert per_rank.cpu().tolist() == [0, 0] and per_expert.cpu().tolist() == [0] * 8
    assert counts.cpu().tolist() == [0, 0]
    x = dev.put(torch.empty(0, 16, dtype=dtype))
    buffer = dev.put(torch.empty(16, dtype=torch.uint8))
    dev.launch("dispatch_pack", x=x.data_ptr(), x_bytes=16 * x.element_size(), num_experts=8,
               send_pos=send_pos.data_ptr(), num_tokens=0, num_ranks=2, send_buffer=buffer.data_ptr(),
               error_flag=flag.data_ptr())
    out = dev.put(torch.empty(0, 16, dtype=dtype))
    dev.launch("combine_reduce", dtype=KERNEL_DTYPE_CODES[dtype], recv_buffer=buffer.data_ptr(), hidden=16,
               send_pos=send_pos.data_ptr(), num_tokens=0, num_ranks=2, combined_x=out.data_ptr())
    dev.launch("combine_pack", x=x.data_ptr(), x_bytes=16 * x.element_size(), recv_counts=counts.data_ptr(),
               num_ranks=2, send_buffer=buffer.data_ptr())
    # No source rows but a fixed-size output: every row is padding and must be zeroed.
    pair_pos = dev.put(torch.empty(0, 2, dtype=torch.int32))
    offsets = dev.put(torch.zeros(3, dtype=torch.int64))
    per_expert64 = dev.put(torch.zeros(2, dtype=torch.int64))
    permuted = dev.put(torch.full((5, 16), 7.0, dtype=dtype))
    dev.launch("permute_rows", dtype=KERNEL_DTYPE_CODES[dtype], x=x.data_ptr(), num_rows=0, hidden=16, num_topk=2,
               pair_pos=pair_pos.data_ptr(), expert_offsets=offsets.data_ptr(),
               num_tokens_per_expert=per_expert64.data_ptr(), num_local_experts=2, num_out_rows=5,
               out=permuted.data_ptr())
    dev.launch("unpermute_rows", dtype=KERNEL_DTYPE_CODES[dtype], y=permuted.data_ptr(), num_in_rows=5, hidden=16,
               num_topk=2, pair_pos=pair_pos.data_ptr(), num_rows=0, out=out.data_ptr())
    assert flag_bits(dev, flag) == 0
    assert bool((permuted.cpu() == 0).all())
