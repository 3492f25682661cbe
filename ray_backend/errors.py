"""What a pool reports to its caller."""


class PoolFailure(RuntimeError):
    """A worker died, hung or failed on its own; the pool is discarded and the next job builds a new one."""


class JobInterrupted(Exception):
    """Every rank stopped the job at the same step because the user interrupted it."""
