"""Summaries of one cell's request timings, and of several trials of the same cell."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from bench.client import CellRun


@dataclass(slots=True)
class CellSummary:
    requests: int
    errors: int
    short: int  # completed with fewer output tokens than asked (ended early)
    req_per_s: float
    out_tok_per_s: float
    ttft_p50_ms: float | None
    ttft_p99_ms: float | None
    itl_p50_ms: float | None
    itl_p99_ms: float | None
    latency_p50_ms: float | None
    events_per_request: float | None  # streamed events with text per request (< tokens: coalesced)
    wall_s: float
    client_cpu_s: float
    server_cpu_s: dict[str, float] | None = None  # process role -> CPU seconds during the cell
    first_error: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _ms(values: Sequence[float], q: float) -> float | None:
    return float(np.percentile(values, q)) * 1000 if len(values) else None


def summarize(run: CellRun, expected_tokens: int) -> CellSummary:
    ok = [r for r in run.results if r.ok]
    errors = [r for r in run.results if not r.ok]
    ttfts = [r.ttft for r in ok if r.ttft is not None]
    itls = [gap for r in ok for gap in r.itl]
    tokens = sum(r.output_tokens for r in ok)
    wall = max(run.wall_seconds, 1e-9)
    return CellSummary(
        requests=len(run.results),
        errors=len(errors),
        short=sum(1 for r in ok if r.output_tokens < expected_tokens),
        req_per_s=len(ok) / wall,
        out_tok_per_s=tokens / wall,
        ttft_p50_ms=_ms(ttfts, 50),
        ttft_p99_ms=_ms(ttfts, 99),
        itl_p50_ms=_ms(itls, 50),
        itl_p99_ms=_ms(itls, 99),
        latency_p50_ms=_ms([r.latency for r in ok], 50),
        events_per_request=sum(r.events for r in ok) / len(ok) if ok and any(r.events for r in ok) else None,
        wall_s=wall,
        client_cpu_s=run.client_cpu_seconds,
        first_error=errors[0].error if errors else None,
    )


def spread(values: Sequence[float | None]) -> tuple[float, float, float] | None:
    """(median, min, max) of the trials that produced a value."""
    present = [v for v in values if v is not None]
    if not present:
        return None
    return float(np.median(present)), min(present), max(present)
