"""Per request: which path serves it, by prediction, against a TTFT and an ITL SLO.

Paths (with prefill and decode instances up):
- "disaggregated": P prefills the whole prompt and hands the KV to D. TTFT: P's queue and
  compute after prefix hits, plus the handoff measured on that P-D pair. ITL: D's decode step
  with one more request in its batch.
- "local": D prefills the prompt itself. TTFT: D's own queue and compute, no handoff. ITL: D's
  running decodes also wait for this prefill's tokens in their steps, and for the prefills
  already queued there.
- "pipelined": P prefills the head while D prefills the tail, one layer apart. TTFT: the later
  of the two halves, plus the handoff. ITL: D's running decodes wait for the tail, and the step
  that computes it waits, layer by layer, for the head's KV: for P's queue and the head too,
  unless D is gated on P's start (`pipeline_hold_s`).

The ITL SLO bounds each request's mean inter-token latency (what the conductor observes per
stream, and what `bench serve` counts): a prefill on D stalls each running decode once, and
that decode's mean spreads the stall over its gaps (`d_itl_gaps`, learned from the streams D
answered; 1, the stall counted whole, until one is seen), as is the prefill already queued
there (`d_queued_prefill_s`). And a decode meets every stall of its lifetime, not only these:
while D spends a share u of its time prefilling (`d_prefill_share`, measured over the last
seconds), its decode steps come 1 / (1 - u) times as far apart. So the more prefill D takes,
the dearer the next one, and D's share of prefill settles where its decodes' mean ITL meets
the SLO.

The plan keeps the paths whose predicted ITL meets the ITL SLO and takes the one with the
smallest predicted TTFT (ties: disaggregated, then local, then pipelined, i.e. the one that
spends least of D). When no path meets the ITL SLO (D is too loaded already) only the paths
that cost D least remain: disaggregated, or a prefill on a D with nothing else running. With
admission on (a TTFT SLO), a request whose chosen path is predicted to miss either SLO is
rejected instead, but only when load is what makes it miss: a request predicted to miss
even on idle instances (a prompt longer than the TTFT SLO allows, decode steps slower than the
ITL SLO with nothing else running) is served as well as it can be, and counted as
unattainable; refusing it would lose it, and a retry would fare no better.
"""

from __future__ import annotations

from dataclasses import dataclass

PATHS = ("disaggregated", "local", "pipelined")
# A measured prefill share is held below 1: past this D's decodes are taken to be ten times
# slower, which no ITL SLO of use admits, and the ratio stays finite.
MAX_PREFILL_SHARE = 0.9


@dataclass(frozen=True)
class Option:
    path: str
    predicted_ttft_s: float
    predicted_itl_s: float
    pipeline_tokens: int = 0  # pipelined: the head P computes


@dataclass(frozen=True)
class Prediction:
    """The numbers a plan is made of, for one request on one P-D pair."""

    p_prefill_s: float  # P: its queue plus this prompt's uncached tokens
    handoff_s: float  # measured on this P-D pair: D's first token after P's answer
    d_prefill_s: float  # D: its queue plus this whole prompt (local prefill)
    d_base_itl_s: float  # D's decode step with this request added to its batch
    d_running: float  # requests decoding on D now (whose ITL a prefill on D costs)
    d_seconds_per_token: float  # D's prefill compute per token
    prompt_tokens: int
    # Pipelined (0: not possible for this request): the head on P, the tail on D.
    pipeline_tokens: int = 0
    p_head_prefill_s: float = 0.0
    d_tail_prefill_s: float = 0.0
    # How long the D step that computes the tail lasts: what D's running decodes wait.
    pipeline_hold_s: float = 0.0
    # Prefill queued on D already (local prefills, pipelined tails): its decodes wait for it.
    d_queued_prefill_s: float = 0.0
    # The share of D's time it spent prefilling lately (0 <= u < 1).
    d_prefill_share: float = 0.0
    # The gaps of a typical decode on D, over which its mean ITL spreads one stall.
    d_itl_gaps: float = 1.0


def options(pr: Prediction, local: bool = True, pipelined: bool = True,
            disaggregated: bool = True) -> list[Option]:
    """Every allowed path with its predicted TTFT and ITL."""
    out: list[Option] = []

    def itl_with_prefill(held_s: float) -> float:
        if pr.d_running <= 0:
            return pr.d_base_itl_s
        slowed = pr.d_base_itl_s / (1.0 - min(max(pr.d_prefill_share, 0.0), MAX_PREFILL_SHARE))
        return slowed + (held_s + pr.d_queued_prefill_s) / max(pr.d_itl_gaps, 1.0)

    if disaggregated:
        out.append(Option("disaggregated", pr.p_prefill_s + pr.handoff_s, pr.d_base_itl_s))
    if local:
        out.append(Option("local", pr.d_prefill_s,
                          itl_with_prefill(pr.prompt_tokens * pr.d_seconds_per_token)))
    if pipelined and pr.pipeline_tokens > 0:
        tail = pr.prompt_tokens - pr.pipeline_tokens
        held = max(pr.pipeline_hold_s, tail * pr.d_seconds_per_token)
        out.append(Option("pipelined",
                          max(pr.p_head_prefill_s, pr.d_tail_prefill_s) + pr.handoff_s,
                          itl_with_prefill(held), pr.pipeline_tokens))
    return out


@dataclass(frozen=True)
class Plan:
    option: Option | None  # None: rejected
    rejected_for: str = ""  # "ttft" | "itl" when rejected
    within_itl: bool = True  # False: no path met the ITL SLO (disaggregated as the least harm)
    judged: Option | None = None  # rejected: the path whose prediction was judged


def choose(opts: list[Option], slo_ttft_s: float | None, slo_itl_s: float | None,
           idle_ttft_s: float = 0.0, idle_itl_s: float = 0.0) -> Plan:
    """The path to take, or a rejection (only with a TTFT SLO: admission is on). `idle_*`:
    the request's TTFT and ITL on idle instances; a miss they already predict is no reason
    to refuse."""
    if not opts:
        raise ValueError("choose: no path to choose from")
    # A path may cost D's running decodes ITL up to the SLO; when even the least costly path
    # misses it (D is that loaded already), only the least costly paths remain.
    least_itl = min(o.predicted_itl_s for o in opts)
    within_itl = slo_itl_s is None or least_itl <= slo_itl_s
    limit = least_itl if slo_itl_s is None or not within_itl else slo_itl_s
    pool = [o for o in opts if slo_itl_s is None or o.predicted_itl_s <= limit]
    best = min(pool, key=lambda o: (o.predicted_ttft_s, PATHS.index(o.path)))
    if slo_ttft_s is not None:
        if best.predicted_ttft_s > slo_ttft_s >= idle_ttft_s:
            return Plan(None, "ttft", within_itl, best)
        if not within_itl and slo_itl_s is not None and idle_itl_s <= slo_itl_s:
            return Plan(None, "itl", False, best)
    return Plan(best, "", within_itl)
