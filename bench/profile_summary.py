"""Where the time goes in a py-spy profile: the top functions, self and inclusive, per thread.

    py-spy record --pid PID --format speedscope --output prof.json --duration 60 [--idle]
    python -m bench.profile_summary prof.json [--top 25] [--match server/ --match vllm/]

Inclusive share = the fraction of a thread's samples in which the function was on the stack;
self share = the fraction in which it was the innermost frame. A thread that is mostly idle shows
its waits (e.g. `select`) only when py-spy ran with `--idle`.
"""

from __future__ import annotations

import argparse
import json
from collections import Counter
from pathlib import Path
from typing import Any


def _label(frame: dict[str, Any]) -> str:
    file = frame.get("file", "")
    for marker in ("site-packages/", "lib/python3.11/", "/work/wt/"):
        if marker in file:
            file = file.split(marker, 1)[1]
    return f"{frame['name']} ({file}:{frame.get('line', '?')})"


def summarize(path: Path, top: int, matches: list[str]) -> str:
    data = json.loads(path.read_text())
    frames = data["shared"]["frames"]
    out = []
    for profile in data["profiles"]:
        samples, weights = profile["samples"], profile["weights"]
        total = sum(weights)
        if total == 0:
            continue
        inclusive: Counter[int] = Counter()
        own: Counter[int] = Counter()
        for stack, weight in zip(samples, weights, strict=True):
            for index in set(stack):
                inclusive[index] += weight
            if stack:
                own[stack[-1]] += weight
        out.append(f"== {profile['name']}: {total} samples")

        def keep(index: int) -> bool:
            return not matches or any(m in frames[index].get("file", "") for m in matches)

        out.append("  inclusive:")
        for index, weight in [(i, w) for i, w in inclusive.most_common() if keep(i)][:top]:
            out.append(f"    {100 * weight / total:5.1f}%  {_label(frames[index])}")
        out.append("  self:")
        for index, weight in [(i, w) for i, w in own.most_common() if keep(i)][:top]:
            out.append(f"    {100 * weight / total:5.1f}%  {_label(frames[index])}")
    return "\n".join(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("profile", type=Path)
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument("--match", action="append", default=[], help="only frames whose file contains this")
    args = parser.parse_args()
    print(summarize(args.profile, args.top, args.match))


if __name__ == "__main__":
    main()
