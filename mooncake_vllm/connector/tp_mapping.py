"""Which KV heads go from which prefill rank to which decode rank, when the two sides run
different tensor-parallel sizes (issue 14).

vLLM shards a model's `H` KV heads over `t` ranks: with `t <= H` (H a multiple of t) rank r
holds heads [r*H/t, (r+1)*H/t); with `t > H` (t a multiple of H) every head is replicated on
t/H consecutive ranks and rank r holds head r // (t/H). Each decode rank needs exactly the heads
it holds; each of them is written once, by one prefill rank that holds it (among replicas, the
one chosen spreads decode ranks over them). A transfer into a decode rank is complete only when
every prefill rank that feeds it (`feeders`) has written its part.

Pure arithmetic, no vLLM: `heads_of` is vLLM's rule, `head_map` the plan both sides compute
from the two published layouts (`head_runs_into`: one pair of ranks' share), and an
impossible pairing is refused naming both.
"""

from __future__ import annotations

from dataclasses import dataclass

from mooncake_vllm.connector.messages import LayoutInfo


class TPMismatch(ValueError):
    """Two tensor-parallel layouts that cannot exchange KV; the message names both."""


@dataclass(frozen=True)
class HeadRun:
    """`count` consecutive KV heads: from prefill rank `src_rank`, its local heads from
    `src_head`, into decode rank `dst_rank`, its local heads from `dst_head`."""

    src_rank: int
    dst_rank: int
    src_head: int
    dst_head: int
    count: int


def _check(num_kv_heads: int, tp: int, side: str) -> None:
    if num_kv_heads < 1 or tp < 1:
        raise TPMismatch(f"{side}: {num_kv_heads} KV heads over tensor-parallel size {tp}")
    if num_kv_heads % tp and tp % num_kv_heads:
        raise TPMismatch(f"{side}: {num_kv_heads} KV heads cannot be sharded over "
                         f"tensor-parallel size {tp} (neither divides the other)")


def heads_of(rank: int, tp: int, num_kv_heads: int) -> range:
    """The model's KV heads that rank `rank` of `tp` holds (vLLM's sharding)."""
    _check(num_kv_heads, tp, "layout")
    if not 0 <= rank < tp:
        raise TPMismatch(f"rank {rank} is not below tensor-parallel size {tp}")
    if tp <= num_kv_heads:
        per = num_kv_heads // tp
        return range(rank * per, (rank + 1) * per)
    head = rank // (tp // num_kv_heads)
    return range(head, head + 1)


def _holder(head: int, tp: int, num_kv_heads: int, spread: int) -> tuple[int, int]:
    """(rank, local index) of a rank holding `head`; among replicas the `spread`-th."""
    if tp <= num_kv_heads:
        per = num_kv_heads // tp
        return head // per, head % per
    replicas = tp // num_kv_heads
    return head * replicas + spread % replicas, 0


def head_map(num_kv_heads: int, src_tp: int, dst_tp: int) -> list[HeadRun]:
    """Every run of heads to write, for a prefill of `src_tp` ranks into a decode of
    `dst_tp` ranks; runs of consecutive heads between one pair of ranks are merged."""
    if src_tp < 1 or dst_tp < 1 or (src_tp % dst_tp and dst_tp % src_tp):
        raise TPMismatch(f"tensor-parallel sizes {src_tp} on prefill and {dst_tp} on decode: "
                         "one must divide the other")
    _check(num_kv_heads, src_tp, "prefill")
    _check(num_kv_heads, dst_tp, "decode")
    runs: list[HeadRun] = []
    for dst in range(dst_tp):
        for dst_head, head in enumerate(heads_of(dst, dst_tp, num_kv_heads)):
            src, src_head = _holder(head, src_tp, num_kv_heads, spread=dst)
            last = runs[-1] if runs else None
            if (last is not None and last.src_rank == src and last.dst_rank == dst
                    and last.src_head + last.count == src_head
                    and last.dst_head + last.count == dst_head):
                runs[-1] = HeadRun(src, dst, last.src_head, last.dst_head, last.count + 1)
            else:
                runs.append(HeadRun(src, dst, src_head, dst_head, 1))
    return runs


def feeders(runs: list[HeadRun], dst_rank: int) -> set[int]:
    """The prefill ranks whose writes a decode rank's transfer waits for."""
    return {r.src_rank for r in runs if r.dst_rank == dst_rank}


def _describe(layout: LayoutInfo) -> str:
    return (f"TP {layout.tp_size} with {layout.num_kv_heads} KV heads per rank "
            f"({layout.total_kv_heads} in all)")


def head_runs_into(prefill: LayoutInfo, decode: LayoutInfo) -> list[HeadRun] | None:
    """What prefill rank `prefill.tp_rank` writes into decode rank `decode.tp_rank`: None
    between equal tensor-parallel sizes (whole blocks, rank to rank), else its runs of heads.
    TPMismatch, naming both layouts, for a pairing that cannot work or is not supported."""
    if prefill.tp_size == decode.tp_size:
        return None
    both = f"prefill {_describe(prefill)}, decode {_describe(decode)}"
    if prefill.total_kv_heads != decode.total_kv_heads:
        raise TPMismatch(f"the models' KV heads differ: {both}")
    if prefill.heads is None or decode.heads is None:
        raise TPMismatch(f"where a KV head lies in a block is unknown on "
                         f"{'prefill' if prefill.heads is None else 'decode'}: {both}")
    if (prefill.heads[0], prefill.heads[3]) != (decode.heads[0], decode.heads[3]):
        raise TPMismatch(f"one KV head's part of a block differs ({prefill.heads} on prefill, "
                         f"{decode.heads} on decode): {both}")
    try:
        runs = head_map(prefill.total_kv_heads, prefill.tp_size, decode.tp_size)
    except TPMismatch as e:
        raise TPMismatch(f"{e}: {both}") from None
    mine = [r for r in runs if r.src_rank == prefill.tp_rank and r.dst_rank == decode.tp_rank]
    if not mine:
        raise TPMismatch(f"prefill rank {prefill.tp_rank} holds none of decode rank "
                         f"{decode.tp_rank}'s KV heads: {both}")
    return mine


def decode_ranks_fed(prefill: LayoutInfo, decode: LayoutInfo) -> set[int]:
    """The decode ranks that prefill rank `prefill.tp_rank` writes into, for a decode of
    `decode`'s layout (the one that registered first): its own rank between equal sizes."""
    if prefill.tp_size == decode.tp_size:
        return {prefill.tp_rank}
    runs = head_map(prefill.total_kv_heads, prefill.tp_size, decode.tp_size)
    return {r.dst_rank for r in runs if r.src_rank == prefill.tp_rank}
