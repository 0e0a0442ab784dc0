"""A tiny "job": reads the mounted data, writes a report under uploads/ and a score to $OW_OUTPUTS."""

import json
import os

with open("data/conversations.jsonl") as f:
    rows = [json.loads(line) for line in f]
turns = sum(len(row.get("messages", [])) for row in rows)
print(f"read {len(rows)} conversations with {turns} messages")
os.makedirs("uploads", exist_ok=True)
with open("uploads/report.md", "w") as f:
    f.write(f"# Report\n\n{len(rows)} conversations, {turns} messages\n")
with open(os.environ["OW_OUTPUTS"], "w") as f:
    json.dump({"conversations": len(rows), "messages": turns}, f)
