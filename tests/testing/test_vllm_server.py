"""How a test server's cores are handed to vLLM's CPU backend (no vLLM started)."""

from __future__ import annotations

from mooncake_vllm.testing.vllm_server import omp_bind


def test_one_rank_takes_every_core() -> None:
    assert omp_bind([0, 1, 2], 1) == "0,1,2"


def test_ranks_split_the_cores_with_a_bar_between_them() -> None:
    assert omp_bind([0, 1, 2, 3], 2) == "0,1|2,3"
    assert omp_bind([4, 5], 2) == "4|5"


def test_more_ranks_than_cores_take_them_in_turn() -> None:
    assert omp_bind([0, 1], 4) == "0|1|0|1"
    assert omp_bind([3], 2) == "3|3"
