"""The job's own code: runs in the job's work dir, wherever the job runs (this machine, a worker, a GPU pod).

Reads the mounted data/ directory, writes a report under uploads/ (it becomes a result file) and its numbers to
$OW_OUTPUTS (they become job.outputs).
"""

import argparse
import json
import os
from pathlib import Path

parser = argparse.ArgumentParser()
parser.add_argument("--min-messages", type=int, default=0, help="count only conversations with this many messages")
args = parser.parse_args()

rows = [json.loads(line) for path in sorted(Path("data").glob("*.jsonl")) for line in path.read_text().splitlines()]
kept = [row for row in rows if len(row.get("messages", [])) >= args.min_messages]
messages = sum(len(row.get("messages", [])) for row in kept)
print(f"read {len(rows)} rows; {len(kept)} have at least {args.min_messages} messages ({messages} in all)")

Path("uploads").mkdir(exist_ok=True)
Path("uploads/report.md").write_text(f"# Report\n\n{len(kept)} of {len(rows)} conversations, {messages} messages\n")
with open(os.environ["OW_OUTPUTS"], "w") as f:
    json.dump({"rows": len(rows), "conversations": len(kept), "messages": messages}, f)
