"""Print one table row per run_summary.json given: the figures a benchmark or smoke run reports."""

import json
import sys
from pathlib import Path

print(f"{'run':28} {'status':10} {'steps':>5} {'first':>7} {'last':>7} {'tok/s':>8} {'peak GiB':>8} {'attn':>16}")
for path in map(Path, sys.argv[1:]):
    if not path.exists():
        print(f"{path.stem:28} missing")
        continue
    s = json.loads(path.read_text())
    rate = s["tokens_per_second"]["last_logged"] or s["tokens_per_second"]["mean_over_run"] or 0
    peak = s["peak_gpu_memory_gib"] or 0
    print(
        f"{path.stem:28} {s['status'][:10]:10} {s['global_step']:>5} {s['first_loss'] or 0:>7.3f} "
        f"{s['last_loss'] or 0:>7.3f} {rate:>8.0f} {peak:>8.1f} {s['attn_implementation']:>16}"
    )
