"""Where a trajectory recording puts things: segment boundaries, file names, metadata.

Shared by the recorder (:mod:`~clipood_plugin.posthoc.recorder`) and the reader
(:mod:`~clipood_plugin.posthoc.snapshots`), so both agree on one layout.

Segments. A run of T optimizer steps has the exact points θ_0 and θ_T and, for the steps
1..T−1 in between, K segment means. The boundaries are cosine-spaced,
``b_j = round(T · (1 − cos(π j / K)) / 2)`` for j = 0..K (duplicates dropped), so segments are
shortest at both ends of the run, where Beta(β, β) weights with β < 1 pile up and change fastest,
and longest in the middle, where they are flat. Segment j holds the mean of θ_t over
``b_j < t ≤ b_{j+1}``; the last one stops at T − 1 because θ_T is kept exactly. With T ≤ 2K/π
(20 steps for K = 32) every segment is a single step and the recording is exact.

Files in the recording directory::

    manifest.json                               T, K, the boundaries, the recording id
    theta-00000000.safetensors                  θ_0: the full state dict (buffers too)
    mean-00000001-00000003.safetensors          the mean of θ_1..θ_3 (float parameters, fp32)
    ...
    theta-<T>.safetensors                       θ_T, written after the last step

Each safetensors file carries its own metadata (kind, steps, count, recording id) under the key
:data:`META_KEY`, so a stale file from another recording in the same directory is recognised and
skipped, never mixed in.
"""

from __future__ import annotations

import itertools
import json
import math
from typing import Any

__all__ = [
    "DEFAULT_SEGMENTS",
    "FORMAT_VERSION",
    "MANIFEST",
    "META_KEY",
    "mean_name",
    "point_name",
    "segment_boundaries",
    "segment_spans",
]

#: K, the default number of segment means: every β in {0.1, 0.5, 1, 2} within 1 % (see the README).
DEFAULT_SEGMENTS = 32
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
#: The safetensors metadata key holding a file's JSON description.
META_KEY = "clipood_posthoc"
KIND = "trajectory_snapshots"


def check_segments(segments: int) -> int:
    if isinstance(segments, bool) or not isinstance(segments, int) or segments < 1:
        raise ValueError(f"segments must be a positive int (K, the number of segment means), got {segments!r}")
    return segments


def segment_boundaries(total_steps: int, segments: int = DEFAULT_SEGMENTS) -> list[int]:
    """The boundaries ``0 = b_0 < b_1 < … = T``, cosine-spaced (finer near both ends of the run)."""
    if isinstance(total_steps, bool) or not isinstance(total_steps, int) or total_steps < 1:
        raise ValueError(f"total_steps must be a positive int (the number of optimizer steps), got {total_steps!r}")
    check_segments(segments)
    raw = (round(total_steps * (1.0 - math.cos(math.pi * j / segments)) / 2.0) for j in range(segments + 1))
    return sorted(set(raw) | {0, total_steps})


def segment_spans(boundaries: list[int]) -> list[tuple[int, int]]:
    """Inclusive step ranges ``(start, end)`` of the segment means: ``b_j + 1 .. b_{j+1}``, the last
    one cut at T − 1 (θ_T is kept exactly); an empty last range is dropped."""
    total = boundaries[-1]
    spans = [(lo + 1, min(hi, total - 1)) for lo, hi in itertools.pairwise(boundaries)]
    return [(start, end) for start, end in spans if start <= end]


def point_name(step: int) -> str:
    return f"theta-{step:08d}.safetensors"


def mean_name(start: int, end: int) -> str:
    return f"mean-{start:08d}-{end:08d}.safetensors"


def encode_meta(meta: dict[str, Any]) -> dict[str, str]:
    return {META_KEY: json.dumps(meta, sort_keys=True)}


def decode_meta(metadata: dict[str, str] | None) -> dict[str, Any] | None:
    if not metadata or META_KEY not in metadata:
        return None
    try:
        meta = json.loads(metadata[META_KEY])
    except json.JSONDecodeError:
        return None
    return meta if isinstance(meta, dict) else None
