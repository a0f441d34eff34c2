"""`--profile DIR` of `python scripts/bench.py sampler|train|rl-step`: where one call's time goes.

After the timed calls (so no figure includes profiler overhead), the subject runs once more under
`jax.profiler.trace`; the trace lands in DIR/<name>/ (open it in Perfetto or TensorBoard) and is
summarised here: every traced span's self time (its duration minus the spans nested inside it on
the same thread), summed by name. On a GPU/TPU only the device's tracks count (kernels and XLA
ops); on a CPU the XLA worker threads do (Python frames and the calling thread are left out);
spans that only wait for other threads are left out everywhere.
The summary (top ops, and top kinds: op names without their ".N" suffix) goes into the JSON
record as `profile` and is printed after the main table. To see what an XLA op such as
`ynn_fusion.12` computes, rerun with XLA_FLAGS="--xla_dump_to=HLO --xla_dump_hlo_as_text" and
look it up in HLO/*after_optimizations.txt (its metadata names the jax operation).
Test: `pytest tests/test_bench.py -k profile`.
"""
from __future__ import annotations

import collections
import gzip
import json
import re
from pathlib import Path

import jax

TOP = 15  # ops listed per profiled call


def profile(directory: str, name: str, fn) -> dict:
    """Run `fn()` once under the profiler; return {name, trace, busy_ms, top_ops} for the record."""
    out = Path(directory) / name
    with jax.profiler.trace(str(out), create_perfetto_trace=True):
        jax.block_until_ready(fn())
    traces = sorted(out.rglob("*.trace.json.gz"), key=lambda p: p.stat().st_mtime)
    if not traces:
        raise RuntimeError(f"jax.profiler wrote no *.trace.json.gz under {out}")
    with gzip.open(traces[-1], "rt", encoding="utf-8") as f:
        events = json.load(f)["traceEvents"]
    self_us, counts = self_times(events)
    busy = sum(self_us.values())

    def rows(times, n):
        return [{"name": k, "self_ms": round(us / 1e3, 3), "count": n[k], "frac": round(us / busy, 4) if busy else 0.0}
                for k, us in times.most_common(TOP)]

    kinds, kind_counts = collections.Counter(), collections.Counter()
    for op, us in self_us.items():  # "ynn_fusion.12" and "ynn_fusion.3" are both "ynn_fusion"
        kind = re.sub(r"\.\d+$", "", op)
        kinds[kind] += us
        kind_counts[kind] += counts[op]
    return {"name": name, "trace": str(traces[-1]), "busy_ms": round(busy / 1e3, 3),
            "top_ops": rows(self_us, counts), "top_kinds": rows(kinds, kind_counts)}


def self_times(events: list[dict]) -> tuple[collections.Counter, collections.Counter]:
    """Self time (µs) and count per span name over the tracks that run the computation."""
    procs = {e["pid"]: e["args"]["name"] for e in events if e.get("ph") == "M" and e.get("name") == "process_name"}
    threads = {(e["pid"], e.get("tid")): e["args"]["name"] for e in events
               if e.get("ph") == "M" and e.get("name") == "thread_name"}
    device = {pid for pid, n in procs.items() if "/device:" in n}

    def counted(e):
        if "wait" in e["name"].lower():  # a thread waiting for others (ThunkExecutor's, the pool's Await)
            return False
        if device:
            return e["pid"] in device
        return not e["name"].startswith("$") and threads.get((e["pid"], e.get("tid")), "") != "python"

    tracks = collections.defaultdict(list)
    for e in events:
        if e.get("ph") == "X" and "dur" in e and counted(e):
            tracks[(e["pid"], e.get("tid"))].append(e)
    self_us, counts = collections.Counter(), collections.Counter()
    for spans in tracks.values():
        spans.sort(key=lambda e: (e["ts"], -e["dur"]))
        stack: list[tuple[float, str]] = []  # (end, name) of the open spans
        for e in spans:
            start, end = e["ts"], e["ts"] + e["dur"]
            while stack and stack[-1][0] <= start:
                stack.pop()
            if stack and end <= stack[-1][0]:
                self_us[stack[-1][1]] -= e["dur"]  # nested: not the parent's own time
            self_us[e["name"]] += e["dur"]
            counts[e["name"]] += 1
            stack.append((end, e["name"]))
    return self_us, counts


def print_summary(summaries: list[dict]) -> None:
    for s in summaries:
        print(f"\nprofile {s['name']}: {s['busy_ms']:.1f} ms busy on the traced tracks; trace {s['trace']}")
        for title, ops in (("by op", s["top_ops"]), ("by kind (op name without its .N suffix)", s["top_kinds"])):
            print(f"  {title}:")
            width = max([len(o["name"][:60]) for o in ops] + [4])
            for o in ops:
                print(f"    {o['name'][:60].ljust(width)}  {o['self_ms']:9.2f} ms  {100 * o['frac']:5.1f}%  x{o['count']}")
