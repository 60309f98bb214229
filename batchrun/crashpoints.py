"""Named points where the crash-safety tests kill a real `batchrun run` with SIGKILL.

`BATCHRUN_CRASH_AT=after_intent` (or `name:N`, the Nth time the point is reached) makes the process
kill itself there, exactly as a power cut or `kill -9` would. Unset, a point costs one dict lookup.
The points are the moments where a crash could cost money or a result:
- after_intent: the intent is durable, the POST not yet sent;
- after_post: the API accepted the job, its request_id not yet recorded;
- mid_download: part of a video is in its .part file;
- provenance_batch: jobs are `done` in the ledger, their `<id>.json` files not yet written;
- results_rewrite: results.jsonl's new content is written to a temporary file, not yet renamed;
- report_rewrite: the same for report.html;
- media_read: the media reader (a child process, batchrun.mediafacts) is about to read a video.
"""

from __future__ import annotations

import os
import signal
from collections import Counter

_hits: Counter[str] = Counter()


def crashpoint(name: str) -> None:
    target = os.environ.get("BATCHRUN_CRASH_AT")
    if not target:
        return
    point, _, nth = target.partition(":")
    if point != name:
        return
    _hits[name] += 1
    if _hits[name] >= (int(nth) if nth.isdigit() else 1):
        os.kill(os.getpid(), signal.SIGKILL)
