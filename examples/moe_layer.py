"""Train a small MoE transformer with eplib across ranks: next-character prediction on Python's own
standard-library source (no download), with auxiliary-loss-free load balancing.

Run:  torchrun --standalone --nproc_per_node=4 examples/moe_layer.py [--parallel ep|tp|auto] ...

Every rank holds all of the model except the routed experts, of which it owns ``E / R`` (the
``eplib.MoE`` layers place them). Each rank trains on its own batches. The replicated parameters
train data-parallel with torch's own wrappers, the experts left out of them
(``eplib.moe.ddp``, or ``--data-parallel fsdp``: ``eplib.moe.fully_shard_dense``, FSDP2 on each
block and the rest); the expert gradients already arrive summed over the ranks (through combine's
backward in ep mode, the reduce-scatter in tp mode). ``eplib.moe.Balancer`` moves the routing bias
once per step. CPU ranks over gloo by default; with GPUs, one GPU per rank over NCCL.

``--balancer quantile`` swaps DeepSeek-V3's sign rule for the quantile controller. It prints a line
every ``--log-every`` steps (loss, batch MaxVio, tokens/s, time in dispatch and combine or in the tp
weight exchange) and a summary, and exits non-zero if the loss did not fall.
"""

import argparse
import gc
import inspect
import json
import math
import os
import sys
import time
from typing import Dict, Iterator, List, Optional, Sequence

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

import eplib
from eplib.moe import Balancer

Tensor = torch.Tensor
VOCAB = 128  # ASCII; other characters map to "?"
CORPUS_MODULES = ("argparse", "textwrap", "difflib", "string", "fractions", "heapq")


def load_corpus() -> Tensor:
    """int64 character ids of a few pure-Python standard-library modules, the same on every rank."""
    import importlib

    text = "\n".join(inspect.getsource(importlib.import_module(name)) for name in CORPUS_MODULES)
    return torch.tensor([b if b < VOCAB else ord("?") for b in text.encode("ascii", "replace")], dtype=torch.int64)


class Block(nn.Module):
    """Pre-norm transformer block: causal self-attention, then an eplib.MoE feed-forward."""

    def __init__(self, hidden: int, heads: int, moe: eplib.MoE) -> None:
        super().__init__()
        self.heads = heads
        self.attn_norm = nn.RMSNorm(hidden)
        self.qkv = nn.Linear(hidden, 3 * hidden, bias=False)
        self.proj = nn.Linear(hidden, hidden, bias=False)
        self.moe_norm = nn.RMSNorm(hidden)
        self.moe = moe

    def forward(self, x: Tensor) -> Tensor:
        batch, seq, hidden = x.shape
        q, k, v = self.qkv(self.attn_norm(x)).view(batch, seq, 3, self.heads, -1).permute(2, 0, 3, 1, 4)
        attn = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(batch, seq, hidden)
        x = x + self.proj(attn)
        return x + self.moe(self.moe_norm(x))


class TinyMoELM(nn.Module):
    """Character embedding, ``layers`` MoE blocks, tied output head."""

    def __init__(self, args: argparse.Namespace, device: torch.device) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, args.hidden)
        # Small embeddings: the tied head then starts near uniform guessing (loss ln 128).
        nn.init.normal_(self.embed.weight, std=args.hidden ** -0.5)
        self.blocks = nn.ModuleList(
            Block(args.hidden, args.heads,
                  eplib.MoE(args.hidden, args.ffn_hidden, args.experts, args.top_k, parallel=args.parallel,
                            score_func=args.score_func, seed=args.seed * 100 + layer, device=device))
            for layer in range(args.layers))
        self.norm = nn.RMSNorm(args.hidden)

    def forward(self, ids: Tensor) -> Tensor:
        x = self.embed(ids)
        for block in self.blocks:
            x = block(x)
        return self.norm(x) @ self.embed.weight.T


def data_parallel(model: TinyMoELM, mode: str) -> nn.Module:
    """The module to train: ``model`` under DDP (``"ddp"``), or sharded by FSDP2 per block and at
    the root (``"fsdp"``, returns ``model`` itself), the routed experts left out either way."""
    if mode == "ddp":
        return eplib.moe.ddp(model)
    return eplib.moe.fully_shard_dense(model, blocks=model.blocks)


def batches(args: argparse.Namespace, device: torch.device) -> Iterator[Tensor]:
    """This rank's windows of ``seq_len + 1`` characters, ``[batch, seq_len + 1]`` int64, forever."""
    corpus = load_corpus().to(device)
    generator = torch.Generator(device=device).manual_seed(args.seed * 10_000 + 1 + dist.get_rank())
    while True:
        starts = torch.randint(0, corpus.numel() - args.seq_len - 1, (args.batch,), generator=generator,
                               device=device)
        yield corpus[starts.unsqueeze(1) + torch.arange(args.seq_len + 1, device=device)]


def train_step(module: nn.Module, optimizer: torch.optim.Optimizer, balancer: Balancer, window: Tensor) -> Tensor:
    """One step on ``window [batch, seq_len + 1]``; returns this rank's loss. Each rank minimises its
    own loss; the data-parallel wrapper averages the replicated gradients, the expert gradients are
    scaled to match (the objective is the mean of the ranks' losses)."""
    logits = module(window[:, :-1])
    loss = F.cross_entropy(logits.reshape(-1, VOCAB), window[:, 1:].reshape(-1))
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    balancer.step()
    return loss


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--parallel", choices=("ep", "tp", "auto"), default="ep")
    parser.add_argument("--data-parallel", choices=("ddp", "fsdp"), default="ddp",
                        help="how the replicated parameters train: DDP, or FSDP2 (fully_shard) per block")
    parser.add_argument("--experts", type=int, default=8, help="a multiple of the number of ranks")
    parser.add_argument("--top-k", type=int, default=2)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--balancer", choices=("sign", "quantile"), default="sign",
                        help="the bias controller: DeepSeek-V3's sign rule or the quantile controller")
    parser.add_argument("--bias-update-rate", type=float, default=1e-2,
                        help="γ of the sign rule (DeepSeek-V3 used 1e-3 over a far longer run)")
    parser.add_argument("--damping", type=float, default=0.5,
                        help="the quantile controller's step toward each batch's balancing bias, in (0, 1]")
    parser.add_argument("--score-func", choices=("softmax", "sigmoid"), default="sigmoid")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--ffn-hidden", type=int, default=128, help="intermediate size of each expert")
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--batch", type=int, default=8, help="sequences per rank per step")
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--log-every", type=int, default=20)
    parser.add_argument("--plot", metavar="OUT.png", help="write loss and MaxVio curves (needs matplotlib)")
    parser.add_argument("--json", metavar="OUT.json", help="write the per-step loss and MaxVio and the summary")
    args = parser.parse_args(argv)
    if min(args.experts, args.top_k, args.steps, args.layers, args.hidden, args.heads, args.ffn_hidden,
           args.seq_len, args.batch, args.log_every) < 1 or args.top_k > args.experts:
        parser.error("sizes and counts must be >= 1, and --top-k at most --experts")
    if args.hidden % args.heads != 0:
        parser.error(f"--hidden {args.hidden} must be a multiple of --heads {args.heads}")
    if not (math.isfinite(args.bias_update_rate) and args.bias_update_rate >= 0):
        parser.error("--bias-update-rate must be a finite number >= 0")
    if not 0 < args.damping <= 1:
        parser.error("--damping must be in (0, 1]")
    if args.plot:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            parser.error("--plot needs matplotlib: pip install 'eplib[plot]'")
    return args


def write_plot(path: str, history: Dict[str, List[float]]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (loss_axis, vio_axis) = plt.subplots(1, 2, figsize=(10, 4))
    loss_axis.plot(history["loss"])
    loss_axis.set(xlabel="step", ylabel="loss (nats/char)", title="training loss")
    vio_axis.plot(history["max_vio"])
    vio_axis.set(xlabel="step", ylabel="batch MaxVio (max over layers)", title="expert load imbalance")
    figure.tight_layout()
    figure.savefig(path, dpi=120)


def main() -> int:
    args = parse_args()
    use_cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if use_cuda else "gloo")
    world = dist.get_world_size()
    if args.experts % world != 0:
        raise SystemExit(f"--experts {args.experts} must be a multiple of the number of ranks {world}")
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(device)
    try:
        loss_fell = train(args, device)
    finally:
        # Free what still holds the group (the model's Buffer, autograd nodes; some sit in reference
        # cycles) so that the group is torn down here, while Python still runs: a gloo group torn
        # down during interpreter exit can abort the process from one of its worker threads.
        gc.collect()
        dist.destroy_process_group()
    return 0 if loss_fell else 1


def train(args: argparse.Namespace, device: torch.device) -> bool:
    """The training loop; returns whether the loss fell."""
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(args.seed)  # the same replicated parameters on every rank
    model = TinyMoELM(args, device).to(device)
    module = data_parallel(model, args.data_parallel)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
    balancer = Balancer(model, bias_update_rate=args.bias_update_rate, method=args.balancer, damping=args.damping)
    windows = batches(args, device)
    moe_layers = [block.moe for block in model.blocks]

    history: Dict[str, List[float]] = {"loss": [], "max_vio": [], "max_vio_floor": []}
    tokens_per_step = args.batch * args.seq_len * world
    comm_seconds: Dict[str, float] = {}
    window_start = run_start = time.perf_counter()
    with eplib.timing.record() as phase_times:
        for step in range(1, args.steps + 1):
            loss = train_step(module, optimizer, balancer, next(windows))

            # Logging reads a few device scalars: the training path itself never does.
            # MaxVio and its floor are the group's already (the same on every rank).
            layer_stats = [m.load_stats() for m in moe_layers]
            loss_sum = loss.detach().float().reshape(1)
            dist.all_reduce(loss_sum)
            max_vio = torch.stack([s["max_vio_batch"] for s in layer_stats]).max()
            history["loss"].append(loss_sum.item() / world)
            history["max_vio"].append(max_vio.item())
            history["max_vio_floor"].append(layer_stats[0]["max_vio_floor"].item())
            if step % args.log_every == 0 or step == args.steps:
                elapsed = time.perf_counter() - window_start
                steps_in_window = (step - 1) % args.log_every + 1
                comm = {name: seconds / steps_in_window * 1e3 for name, seconds in phase_times.seconds.items()}
                for name, seconds in phase_times.seconds.items():
                    comm_seconds[name] = comm_seconds.get(name, 0.0) + seconds
                phase_times.reset()
                if rank == 0:
                    comm_text = ", ".join(f"{name} {ms:.1f} ms" for name, ms in sorted(comm.items())) or "no exchange"
                    print(f"step {step:5d}  loss {history['loss'][-1]:.3f}  MaxVio {history['max_vio'][-1]:.3f}  "
                          f"{tokens_per_step * steps_in_window / elapsed:8.0f} tokens/s  per step: {comm_text}  "
                          f"[{moe_layers[0].last_parallel}]", flush=True)
                window_start = time.perf_counter()
    total_seconds = time.perf_counter() - run_start

    head = min(10, len(history["loss"]))
    first_loss, last_loss = (sum(history["loss"][:head]) / head, sum(history["loss"][-head:]) / head)
    first_vio, last_vio = (sum(history["max_vio"][:head]) / head, sum(history["max_vio"][-head:]) / head)
    loss_fell = last_loss < first_loss
    if rank == 0:
        comm_total = sum(comm_seconds.values())
        controller = (f"damping={args.damping:g}" if args.balancer == "quantile"
                      else f"bias_update_rate={args.bias_update_rate:g}")
        print(f"summary: ranks={world} parallel={args.parallel} data_parallel={args.data_parallel} "
              f"experts={args.experts} top_k={args.top_k} "
              f"score_func={args.score_func} balancer={args.balancer} {controller} steps={args.steps} "
              f"device={device.type}")
        print(f"summary: loss {first_loss:.3f} -> {last_loss:.3f} (mean of the first / last {head} steps; "
              f"uniform guessing is {math.log(VOCAB):.3f})")
        print(f"summary: batch MaxVio {first_vio:.3f} -> {last_vio:.3f} (noise floor {history['max_vio_floor'][-1]:.3f})")
        print(f"summary: {tokens_per_step * args.steps / total_seconds:.0f} tokens/s over {total_seconds:.1f} s; "
              f"expert exchange {comm_total:.1f} s ({100 * comm_total / total_seconds:.0f}%: "
              + ", ".join(f"{name} {seconds:.1f} s" for name, seconds in sorted(comm_seconds.items())) + ")")
        print("loss fell" if loss_fell else "FAIL: the loss did not fall")
        if args.plot:
            write_plot(args.plot, history)
            print(f"wrote {args.plot}")
        if args.json:
            with open(args.json, "w") as out:
                json.dump({"args": vars(args), "ranks": world, "history": history, "first_loss": first_loss,
                           "last_loss": last_loss, "seconds": total_seconds}, out)
    return loss_fell


if __name__ == "__main__":
    sys.exit(main())
