"""Process limits shared by the load benchmarks."""
from __future__ import annotations

import resource


def raise_fd_limit() -> int:
    """Soft RLIMIT_NOFILE up to the hard limit: thousands of streams and sockets need more than 1024."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = hard if hard != resource.RLIM_INFINITY else max(soft, 65536)
    if soft < want:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
        except (ValueError, OSError):
            return soft
    return want
