"""EventOverlap on CPU: a completed no-op event (DESIGN.md section 2, Streams). The CUDA behaviour
is tested in tests/test_gpu_buffer.py."""

import pytest
import torch

import eplib
from dist_harness import make_topk_idx, make_topk_weights


def test_event_overlap_without_event_is_a_completed_no_op():
    event = eplib.EventOverlap()
    assert event.event is None and event.extra_tensors is None
    event.current_stream_wait()  # nothing to wait for
    with event as entered:
        assert entered is event


def test_event_overlap_context_manager_lets_exceptions_through():
    with pytest.raises(KeyError):
        with eplib.EventOverlap():
            raise KeyError("body")


def test_event_overlap_keeps_extra_tensors():
    tensors = [torch.zeros(2), torch.ones(3)]
    event = eplib.EventOverlap(None, tensors)
    assert isinstance(event.extra_tensors, tuple) and all(a is b for a, b in zip(event.extra_tensors, tensors))


@pytest.mark.skipif(torch.cuda.is_available(), reason="CPU behaviour: without CUDA capture() records nothing")
def test_capture_without_cuda_is_a_no_op_event():
    event = eplib.Buffer.capture()
    assert isinstance(event, eplib.EventOverlap) and event.event is None
    event.current_stream_wait()


def job_cpu_events(rank, R, group):
    """Every call on CPU tensors returns a completed no-op event, whatever the stream options."""
    buf = eplib.Buffer(group)
    T, E = 6, 2 * R
    idx, w = make_topk_idx(3, rank, T, 2, E, "uniform"), make_topk_weights(3, rank, T, 2)
    x = torch.randn(T, 8)
    options = dict(previous_event=eplib.EventOverlap(), async_finish=True, allocate_on_comm_stream=True)
    lay = buf.get_dispatch_layout(idx, E, **options)
    recv = buf.dispatch(x, num_tokens_per_rank=lay[0], is_token_in_rank=lay[3], num_tokens_per_expert=lay[2],
                        topk_idx=idx, topk_weights=w, **options)
    cached = buf.dispatch(x, handle=recv[4], **options)
    combined = buf.combine(recv[0], recv[4], **options)
    events = [lay[4], recv[5], cached[5], combined[2]]
    return [isinstance(e, eplib.EventOverlap) and e.event is None for e in events] + [buf.get_comm_stream() is None]


@pytest.mark.skipif(torch.cuda.is_available(), reason="get_comm_stream() is None only without CUDA")
def test_cpu_calls_return_completed_events(pool2):
    for rank, flags in enumerate(pool2.run(job_cpu_events)):
        assert all(flags), f"rank {rank}: {flags}"
