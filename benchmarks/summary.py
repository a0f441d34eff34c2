"""One table from bench.py's JSONL records: the figures docs/benchmarks.md's GPU section quotes.

    python -m benchmarks.summary RECORDS.jsonl [STEPS.jsonl]

scripts/device_check.sh prints it at the end. One row per configuration (a sampler or floor sweep
gives a row per row count); STEPS.jsonl (the check's per-step exit statuses) adds a line for each
step that failed or ran out of time, so a missing row is never silent. The last stdout line is one
JSON object: {"device", "jax_version", "commit", "rows": [the table's rows as dicts]}.
Test: `pytest tests/test_device_check.py`.
"""
import json
import subprocess
import sys


def _f(x, fmt: str) -> str:
    return "" if x is None else format(x, fmt)


def rows_of(rec: dict) -> list[dict]:
    """The table rows of one bench record."""
    b = rec["bench"]
    if b == "sampler":
        return [{"bench": b, "shape": f"{r['prompts']}x{r['num_samples']} rows, {rec['max_new_tokens']} new"
                 + (f", {r['slots']} slots" if r.get("slots") else ""),
                 "tokens/s": r["gen_tokens_per_s"], "seconds": r["call_s"], "util": r["mbu"], "util_of": "MBU",
                 "compile_s": r["compile_s"]} for r in (rec.get("sweep") or [rec])]
    if b == "floor":
        return [{"bench": b, "shape": f"{r['rows']} rows", "tokens/s": r["rows"] / r["floor_step_s"],
                 "seconds": r["floor_step_s"], "util": r["mbu"], "util_of": "MBU", "compile_s": None}
                for r in (rec.get("sweep") or [rec])]
    if b == "train":
        return [{"bench": b, "shape": f"{rec['rows']} rows x {rec.get('seq_len', '')}",
                 "tokens/s": rec["step_tokens_per_s"], "seconds": rec["train_step_s"], "util": rec["step_mfu"],
                 "util_of": "MFU", "compile_s": rec.get("compile_s")}]
    if b == "rl-step":
        return [{"bench": b, "shape": f"{rec['questions']}x{rec['num_samples']}, {rec['max_new_tokens']} new",
                 "tokens/s": rec["rollout_tokens_per_s"], "seconds": rec["step_s"], "util": rec["train_mfu"],
                 "util_of": "train MFU", "compile_s": rec["compile_s"]}]
    return []


def main(argv: list[str]) -> int:
    records = [json.loads(line) for line in open(argv[0], encoding="utf-8") if line.strip()]
    steps = [json.loads(line) for line in open(argv[1], encoding="utf-8")] if len(argv) > 1 else []
    table = []
    for rec in records:
        for row in rows_of(rec):
            table.append({"model": rec["model"], "dtype": rec["dtype"], "attention": rec.get("attention"), **row})
    headers = ["bench", "model", "dtype", "attention", "shape", "tokens/s", "seconds", "util", "compile s"]
    cells = [headers] + [[r["bench"], r["model"].split("/")[-1], r["dtype"], r["attention"] or "", r["shape"],
                          _f(r["tokens/s"], ",.0f"), _f(r["seconds"], ".4f"),
                          f"{100 * r['util']:.1f}% {r['util_of']}", _f(r["compile_s"], ".1f")] for r in table]
    widths = [max(len(str(c[i])) for c in cells) for i in range(len(headers))]
    first = records[0] if records else {}
    print(f"device {first.get('device')} ({first.get('platform')}), jax {first.get('jax_version')}")
    for n, c in enumerate(cells):
        print(" | ".join(str(x).ljust(w) for x, w in zip(c, widths)))
        if n == 0:
            print("-+-".join("-" * w for w in widths))
    for s in steps:
        if s["rc"] != 0:
            why = "not run (budget spent)" if s["rc"] is None else (
                "timed out" if s["rc"] == 124 else f"failed (exit {s['rc']})")
            print(f"step {s['step']}: {why} after {s['seconds']} s; see its log")
    commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip() or None
    print(json.dumps({"device": first.get("device"), "jax_version": first.get("jax_version"), "commit": commit,
                      "failed_steps": [s["step"] for s in steps if s["rc"] != 0], "rows": table}))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
