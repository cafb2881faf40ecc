"""eplib.deep_ep: DeepEP V1's package layout, register() under the name deep_ep (never over a real
DeepEP), the handle as DeepEP's intranode 6-tuple, get_local_buffer_tensor, and DeepEP's own intranode
test call pattern (written here in its style, on CPU gloo ranks) against eplib.deep_ep."""

import importlib.util
import os
import re
import subprocess
import sys
import textwrap
import types
from pathlib import Path

import pytest
import torch

import eplib
import eplib.deep_ep as deep_ep
from dist_harness import make_payload, make_topk_idx, make_topk_weights


def test_layout_names_what_deep_ep_exports():
    assert deep_ep.Buffer is eplib.Buffer and deep_ep.buffer.Buffer is eplib.Buffer
    assert deep_ep.Config is eplib.Config and deep_ep.buffer.Config is eplib.Config
    assert deep_ep.EventOverlap is eplib.EventOverlap and deep_ep.utils.EventOverlap is eplib.EventOverlap
    assert deep_ep.utils.EventHandle is deep_ep.EventHandle
    assert deep_ep.topk_idx_t is torch.int64
    assert deep_ep.Buffer.is_sm90_compiled() is True


def test_event_handle_without_cuda_is_a_completed_no_op():
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        pytest.skip("CPU behaviour")
    handle = deep_ep.utils.EventHandle()
    handle.current_stream_wait()
    overlap = deep_ep.EventOverlap(handle)  # as Megatron-core makes its previous_event
    assert overlap.event is None
    with overlap:
        pass


def run_python(code: str, pythonpath: str = "") -> str:
    """Runs code in a fresh interpreter (register() changes sys.modules for good); returns its stdout."""
    env_path = ":".join(p for p in (pythonpath, *sys.path) if p)
    done = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": env_path})
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


REAL_DEEP_EP = importlib.util.find_spec("deep_ep") is not None


@pytest.mark.skipif(REAL_DEEP_EP, reason="a real DeepEP is installed here: register() leaves it the name")
def test_register_answers_to_deep_ep():
    out = run_python("""
        import sys
        import eplib, eplib.deep_ep
        assert "deep_ep" not in sys.modules
        print(eplib.deep_ep.register(), eplib.deep_ep.register())
        import deep_ep
        from deep_ep import Buffer, Config, EventOverlap, topk_idx_t
        from deep_ep.utils import EventHandle, EventOverlap as UtilsEventOverlap
        from deep_ep.buffer import Buffer as BufferModuleBuffer
        print(deep_ep is eplib.deep_ep, Buffer is eplib.Buffer, BufferModuleBuffer is eplib.Buffer,
              UtilsEventOverlap is eplib.EventOverlap, EventHandle is eplib.deep_ep.EventHandle)
    """)
    assert out.split() == ["True"] * 7


def test_register_never_shadows_an_installed_deep_ep(tmp_path):
    fake = tmp_path / "deep_ep"
    fake.mkdir()
    (fake / "__init__.py").write_text("REAL = True\n")
    (fake / "utils.py").write_text("REAL_UTILS = True\n")
    out = run_python("""
        import eplib.deep_ep
        print(eplib.deep_ep.register())
        import deep_ep, deep_ep.utils
        print(deep_ep.REAL, deep_ep.utils.REAL_UTILS)
    """, pythonpath=str(tmp_path))
    assert out.split() == ["False", "True", "True"]


def test_register_keeps_an_imported_deep_ep(monkeypatch):
    imported = types.ModuleType("deep_ep")
    monkeypatch.setitem(sys.modules, "deep_ep", imported)
    assert deep_ep.register() is False
    assert sys.modules["deep_ep"] is imported


# ------------------------------------------------------------------------ the handle, the local buffer


def job_handle_and_local_buffer(rank, R, group):
    """The handle unpacks as DeepEP's intranode 6-tuple; get_local_buffer_tensor gives DeepEP's views."""
    T, H, K, E = 9, 8, 2, 2 * R
    buffer = deep_ep.Buffer(group, num_nvl_bytes=4096, num_rdma_bytes=64)
    whole = buffer.get_local_buffer_tensor(torch.int32)
    whole.copy_(torch.arange(1024, dtype=torch.int32))
    idx, w = make_topk_idx(5, rank, T, K, E, "masked"), make_topk_weights(5, rank, T, K)
    x = make_payload(5, rank, T, H, "fp32")  # row t of rank r encodes (r, t)
    num_tokens_per_rank, _, num_tokens_per_expert, is_token_in_rank, _ = buffer.get_dispatch_layout(idx, E)
    recv_x, _, _, _, handle, _ = buffer.dispatch(x, num_tokens_per_rank=num_tokens_per_rank,
                                                 is_token_in_rank=is_token_in_rank,
                                                 num_tokens_per_expert=num_tokens_per_expert, topk_idx=idx,
                                                 topk_weights=w)
    rank_prefix_matrix, channel_prefix_matrix, recv_channel_prefix_matrix, recv_src_idx, is_token_in_rank_h, \
        send_head = handle
    sources = [make_payload(5, r, T, H, "fp32") for r in range(R)]
    expected_src_idx = torch.cat([torch.nonzero(layout_in_rank(r, T, K, E, R)[:, rank]).flatten() for r in range(R)])
    checks = {
        "len 6": len(handle) == 6,
        "entries are the named fields": (rank_prefix_matrix is handle.rank_prefix_matrix
                                         and recv_src_idx is handle.recv_src_idx and send_head is handle.send_pos),
        "channel_prefix_matrix: rows sent per rank": torch.equal(channel_prefix_matrix,
                                                                 num_tokens_per_rank.view(R, 1)),
        "recv_channel_prefix_matrix: zeros [R, 1]": torch.equal(recv_channel_prefix_matrix,
                                                                torch.zeros(R, 1, dtype=torch.int32)),
        "recv_src_idx": torch.equal(recv_src_idx, expected_src_idx.to(torch.int32)),
        "recv rows are the sources' rows": torch.equal(recv_x, torch.cat([
            s[layout_in_rank(r, T, K, E, R)[:, rank]] for r, s in enumerate(sources)])),
        "is_token_in_rank": torch.equal(is_token_in_rank_h, is_token_in_rank),
        "send_head: -1 where not sent": torch.equal(send_head < 0, ~is_token_in_rank),
        "attributes kept": handle.hidden == H and handle.num_recv_tokens == recv_x.shape[0],
    }

    part = buffer.get_local_buffer_tensor(torch.int32, torch.Size([4, 8]), offset=64)
    checks["get_local_buffer_tensor: num_nvl_bytes as dtype"] = whole.shape == (1024,) and whole.dtype == torch.int32
    checks["get_local_buffer_tensor: same memory, byte offset, size"] = torch.equal(
        part, torch.arange(16, 48, dtype=torch.int32).view(4, 8))
    checks["get_local_buffer_tensor: rdma bytes"] = buffer.get_local_buffer_tensor(
        torch.bfloat16, use_rdma_buffer=True).shape == (32,)
    checks["eplib's calls leave it alone"] = torch.equal(whole, torch.arange(1024, dtype=torch.int32))
    for name, call in (("offset", lambda: buffer.get_local_buffer_tensor(torch.int32, offset=6)),
                       ("size", lambda: buffer.get_local_buffer_tensor(torch.int32, torch.Size([1025])))):
        try:
            call()
            checks[f"{name} rejected"] = False
        except ValueError as error:
            checks[f"{name} rejected"] = str(error).startswith(f"{name}:")
    return checks


def layout_in_rank(source: int, T: int, K: int, E: int, R: int) -> torch.Tensor:
    """is_token_in_rank of `source`'s tokens, from its expert ids (bool [T, R])."""
    idx = make_topk_idx(5, source, T, K, E, "masked")
    ranks = torch.where(idx >= 0, idx // (E // R), R)
    return torch.zeros(T, R + 1, dtype=torch.bool).scatter_(1, ranks, True)[:, :R]


def test_handle_unpacks_as_deep_ep_and_local_buffer(pool):
    for rank, checks in enumerate(pool.run(job_handle_and_local_buffer)):
        assert all(checks.values()), f"rank {rank}: {checks}"


# ------------------------------------------------------------------------ DeepEP's intranode test pattern
# DeepEP's tests/test_intranode.py drives its Buffer like this; the helpers below do what its tests/utils.py
# helpers do (written for this test).


def calc_diff(x: torch.Tensor, y: torch.Tensor) -> float:
    """1 - the cosine-like similarity of x + 1 and y + 1 that DeepEP's tests threshold."""
    x, y = x.double() + 1, y.double() + 1
    return (1 - 2 * (x * y).sum() / (x * x + y * y).sum()).item()


def per_token_cast_to_fp8(x: torch.Tensor):
    """bf16 [m, n] -> (e4m3 [m, n], float32 scales [m, n / 128]): each 128-column block scaled to +-448."""
    m, n = x.shape
    blocks = x.float().view(m, n // 128, 128)
    amax = blocks.abs().amax(dim=2).clamp(min=1e-4)
    values = (blocks * (448.0 / amax[:, :, None])).to(torch.float8_e4m3fn).view(m, n)
    return values, amax / 448.0


def per_token_cast_back(values: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """The inverse of per_token_cast_to_fp8, for float32 scales or int32 ones packing four UE8M0 bytes."""
    if scales.dtype == torch.int32:
        scales = (scales.contiguous().view(torch.uint8).to(torch.int32) << 23).view(torch.float32)
    m, n = values.shape
    return (values.float().view(m, -1, 128) * scales.view(m, -1, 1)).view(m, n).to(torch.bfloat16)


def inplace_unique(rank_idx: torch.Tensor, num_slots: int) -> None:
    """Each row of rank_idx becomes its distinct values >= 0 (descending) followed by -1."""
    present = torch.zeros(rank_idx.shape[0], num_slots + 1, dtype=torch.bool)
    present.scatter_(1, rank_idx.masked_fill(rank_idx < 0, num_slots), True)
    values = torch.where(present[:, :num_slots], torch.arange(num_slots), -1)
    values = values.sort(dim=1, descending=True).values
    width = min(num_slots, rank_idx.shape[1])
    rank_idx.fill_(-1)
    rank_idx[:, :width] = values[:, :width]


def job_deep_ep_intranode(rank, num_ranks, group):
    num_tokens, hidden, num_topk, num_experts, num_sms = 48, 256, 4, 8 * num_ranks, 24
    torch.manual_seed(rank)
    buffer = deep_ep.Buffer(group, int(2e9), 0, low_latency_mode=False, num_qps_per_rank=1, explicitly_destroy=True,
                            allow_mnnvl=False, use_fabric=False)

    x = torch.ones((num_tokens, hidden), dtype=torch.bfloat16) * rank
    x_pure_rand = torch.randn((num_tokens, hidden), dtype=torch.bfloat16)
    x_e4m3 = per_token_cast_to_fp8(x) if deep_ep.Buffer.is_sm90_compiled() else None
    x_e4m3 = (x_e4m3[0], x_e4m3[1].T.contiguous().T) if x_e4m3 is not None else None
    scores = torch.randn((num_tokens, num_experts), dtype=torch.float32).abs() + 1
    topk_idx = torch.topk(scores, num_topk, dim=-1, largest=True, sorted=False)[1].to(deep_ep.topk_idx_t)
    topk_weights = torch.ones((num_tokens, num_topk), dtype=torch.float32) * rank
    topk_weights_pure_rand = torch.randn((num_tokens, num_topk), dtype=torch.float32)
    rank_idx = (topk_idx // (num_experts // num_ranks)).to(torch.int64)
    rank_idx.masked_fill_(topk_idx == -1, -1)
    inplace_unique(rank_idx, num_ranks)

    num_tokens_per_expert = torch.zeros((num_experts,), dtype=torch.int)
    for i in range(num_experts):
        num_tokens_per_expert[i] = (topk_idx == i).sum()
    gbl_num_tokens_per_expert = num_tokens_per_expert.clone()
    torch.distributed.all_reduce(gbl_num_tokens_per_expert, group=group)

    num_tokens_per_rank = torch.empty((num_ranks,), dtype=torch.int)
    token_idx_in_rank = torch.full((num_ranks, num_tokens), -1, dtype=torch.long)
    for i in range(num_ranks):
        num_tokens_per_rank[i] = (rank_idx == i).sum()
        token_sel = (rank_idx == i).max(dim=-1)[0]
        count = token_sel.sum().item()
        tokens = torch.sort(token_sel.to(torch.int), descending=True, stable=True)[1]
        tokens[:count] = torch.sort(tokens[:count])[0]
        token_idx_in_rank[i][tokens[:count]] = torch.arange(count, dtype=torch.long)
    token_idx_in_rank = token_idx_in_rank.T.contiguous().to(torch.int)
    is_token_in_rank = token_idx_in_rank >= 0
    gbl_num_tokens_per_rank = num_tokens_per_rank.clone()
    torch.distributed.all_reduce(gbl_num_tokens_per_rank, group=group)

    ref_num_tokens_per_rank, _, ref_num_tokens_per_expert, ref_is_token_in_rank, _ = \
        buffer.get_dispatch_layout(topk_idx, num_experts)
    assert torch.allclose(ref_num_tokens_per_rank, num_tokens_per_rank)
    assert torch.allclose(ref_num_tokens_per_expert, num_tokens_per_expert)
    assert torch.equal(ref_is_token_in_rank, is_token_in_rank)

    config = deep_ep.Config(num_sms, 8, 256)

    def check_data(check_x, rank_prefix_matrix):
        assert torch.allclose(check_x.amin(dim=1), check_x.amax(dim=1))
        check_start = 0
        for i in range(num_ranks):
            check_end = rank_prefix_matrix[i][rank].item()
            assert (check_x[check_start:check_end, :].int() - i).sum().item() == 0
            check_start = check_end

    runs = 0
    for previous_mode in (False, True):
        for async_mode in (False, True):
            for current_x in filter(lambda elem: elem is not None, (x_pure_rand, x, x_e4m3)):
                for with_topk in (False, True):
                    dispatch_args = {'x': current_x, 'num_tokens_per_rank': num_tokens_per_rank,
                                     'is_token_in_rank': is_token_in_rank,
                                     'num_tokens_per_expert': num_tokens_per_expert, 'config': config,
                                     'async_finish': async_mode}
                    if with_topk:
                        dispatch_args.update({'topk_idx': topk_idx, 'topk_weights': topk_weights_pure_rand
                                              if current_x is x_pure_rand else topk_weights})
                    if previous_mode:
                        dispatch_args.update({'previous_event': buffer.capture()})
                    recv_x, recv_topk_idx, recv_topk_weights, recv_num_tokens_per_expert_list, handle, event = \
                        buffer.dispatch(**dispatch_args)
                    event.current_stream_wait() if async_mode else ()
                    recv_x = per_token_cast_back(*recv_x) if isinstance(recv_x, tuple) else recv_x

                    rank_prefix_matrix = handle[0]
                    assert gbl_num_tokens_per_rank[rank].item() == recv_x.size(0)
                    assert gbl_num_tokens_per_expert.view(num_ranks, -1)[rank].tolist() == \
                        recv_num_tokens_per_expert_list
                    if current_x is not x_pure_rand:
                        check_data(recv_x, rank_prefix_matrix)
                    recv_topk_weights_clone = None
                    if with_topk:
                        assert (recv_topk_idx.eq(-1) | ((recv_topk_idx >= 0) & (
                            recv_topk_idx < (num_experts // num_ranks)))).sum().item() == recv_topk_idx.numel()
                        for i, count in enumerate(recv_num_tokens_per_expert_list):
                            assert recv_topk_idx.eq(i).sum().item() == count
                        recv_topk_weights_clone = recv_topk_weights.clone()
                        if current_x is not x_pure_rand:
                            recv_topk_weights[recv_topk_idx.eq(-1)] = recv_topk_weights.amax(
                                dim=1, keepdim=True).expand_as(recv_topk_weights)[recv_topk_idx.eq(-1)]
                            check_data(recv_topk_weights, rank_prefix_matrix)

                    if with_topk:  # num_worst_tokens != 0
                        num_worst_tokens = num_tokens * num_ranks
                        dispatch_args.update({'num_worst_tokens': num_worst_tokens})
                        recv_worst_x, recv_worst_topk_idx, recv_worst_topk_weights, empty_list, _, event = \
                            buffer.dispatch(**dispatch_args)
                        event.current_stream_wait() if async_mode else ()
                        recv_worst_x = per_token_cast_back(*recv_worst_x) if isinstance(recv_worst_x, tuple) \
                            else recv_worst_x
                        assert len(empty_list) == 0
                        assert num_worst_tokens == recv_worst_x.size(0) == recv_worst_topk_idx.size(0)
                        assert num_worst_tokens == recv_worst_topk_weights.size(0)
                        assert torch.equal(recv_x, recv_worst_x[:recv_x.size(0)])
                        assert torch.equal(recv_topk_idx, recv_worst_topk_idx[:recv_x.size(0)])
                        assert torch.equal(recv_topk_weights_clone, recv_worst_topk_weights[:recv_x.size(0)])
                        assert torch.all(recv_worst_topk_idx[recv_x.size(0):] == -1).item()

                    if not with_topk:  # cached dispatch
                        dispatch_args = {'x': current_x, 'handle': handle, 'config': config, 'async_finish': async_mode}
                        if previous_mode:
                            dispatch_args.update({'previous_event': buffer.capture()})
                        recv_x, _, _, _, _, event = buffer.dispatch(**dispatch_args)
                        event.current_stream_wait() if async_mode else ()
                        recv_x = per_token_cast_back(*recv_x) if isinstance(recv_x, tuple) else recv_x
                        if current_x is not x_pure_rand:
                            check_data(recv_x, rank_prefix_matrix)

                    combine_args = {'x': recv_x, 'handle': handle, 'config': config, 'async_finish': async_mode}
                    if with_topk:
                        combine_args.update({'topk_weights': recv_topk_weights})
                    if previous_mode:
                        combine_args.update({'previous_event': buffer.capture()})
                    combined_x, combined_topk_weights, event = buffer.combine(**combine_args)
                    event.current_stream_wait() if async_mode else ()
                    check_x = combined_x.float() / is_token_in_rank.sum(dim=1).unsqueeze(1)
                    ref_x = x_pure_rand if current_x is x_pure_rand else x
                    assert calc_diff(check_x, ref_x) < 5e-6
                    if with_topk:
                        check_topk_weights = combined_topk_weights if current_x is x_pure_rand else \
                            combined_topk_weights / is_token_in_rank.sum(dim=1).unsqueeze(1)
                        ref_topk_weights = topk_weights_pure_rand if current_x is x_pure_rand else topk_weights
                        assert calc_diff(check_topk_weights, ref_topk_weights) < 1e-9
                    runs += 1

    # The default configs, as DeepEP's tuning loop ends with.
    deep_ep.Buffer.set_num_sms(num_sms)
    recv_x, _, _, _, handle, _ = buffer.dispatch(x, num_tokens_per_rank=num_tokens_per_rank,
                                                 is_token_in_rank=is_token_in_rank,
                                                 num_tokens_per_expert=num_tokens_per_expert,
                                                 config=deep_ep.Buffer.get_dispatch_config(num_ranks))
    buffer.combine(recv_x, handle, config=deep_ep.Buffer.get_combine_config(num_ranks))
    buffer.destroy()
    return runs


def test_deep_ep_intranode_call_pattern(pool):
    assert pool.run(job_deep_ep_intranode, timeout=120) == [24] * pool.world_size


# ------------------------------------------------------------------------ the README's snippet

README = Path(__file__).resolve().parent.parent / "README.md"


def readme_snippet(heading: str) -> str:
    """The first python block of the README section that starts with `heading`."""
    section = README.read_text().split(f"\n{heading}\n", 1)[1]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_readme_coming_from_deep_ep_runs(tmp_path):
    snippet = tmp_path / "snippet.py"
    snippet.write_text(readme_snippet("## Coming from DeepEP"))
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           str(snippet)], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stdout + done.stderr
    assert sorted(re.findall(r"rank (\d): received \d+ tokens", done.stdout)) == ["0", "1"], done.stdout
