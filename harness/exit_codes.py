"""The exit codes of ``ddsm-bench run`` and ``ddsm-bench tune``: written once here, imported everywhere else.

Every code but 0 and 2 means "re-run the same command to continue": nothing finished is lost, and
the re-run picks up where this one stopped (README, "Resume and interruption").
"""
from __future__ import annotations

__all__ = ["BAD_INPUT", "CELLS_FAILED", "CLUSTER_LOST", "EXIT_CODES", "INTERRUPTED", "OK", "TRACKING_LOST", "describe"]

OK = 0  # every cell finished (tune: the budget is reached with at least one completed trial)
CELLS_FAILED = 1  # some cells failed after their retries, the others completed (tune: no trial completed)
BAD_INPUT = 2  # bad spec, option, --out, tracking store or cluster; or --out is held by another driver:
#                nothing was launched, nothing already written was changed
TRACKING_LOST = 3  # the tracking store stayed unreachable past --tracking-outage-s: the driver stopped
#                    cleanly (finished cells on disk, running ones checkpointed, buffered writes journaled)
CLUSTER_LOST = 4  # the Ray cluster (head node or the driver's connection) was lost mid-run
INTERRUPTED = 130  # Ctrl-C / SIGTERM

# code -> what it means, for --help texts and the README table
EXIT_CODES: dict[int, str] = {
    OK: "every cell finished",
    CELLS_FAILED: "some cells failed after their retries (the others completed)",
    BAD_INPUT: "bad input, or --out is in use by another driver (nothing was launched)",
    TRACKING_LOST: "the tracking store stayed unreachable past --tracking-outage-s (re-run to record everything)",
    CLUSTER_LOST: "the Ray cluster was lost (re-run to resume)",
    INTERRUPTED: "interrupted by Ctrl-C / SIGTERM (re-run to resume)",
}


def describe() -> str:
    """One line listing every code, e.g. for an argparse epilog."""
    return "; ".join(f"{code} {text}" for code, text in EXIT_CODES.items())
