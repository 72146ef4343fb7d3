"""Exception types raised by ditcache.

Every error names the thing that is wrong and how to fix it; the types let callers tell
configuration mistakes (fix the input) from runtime faults (a rank diverged, a cache was misused).
"""


class DitCacheError(Exception):
    """Base class of every error raised by ditcache."""


class CacheConfigError(DitCacheError, ValueError):
    """A cache was built with an invalid argument (unknown name, K < 0, bad order, ...)."""


class ParamsError(DitCacheError, ValueError):
    """A params file (or explicit params) is missing a key or holds an invalid value."""


class UnknownModelError(ParamsError, KeyError):
    """A model_type has no shipped or user params file."""

    def __str__(self) -> str:  # KeyError would otherwise print the message in quotes
        return str(self.args[0]) if self.args else ""


class CacheStateError(DitCacheError, RuntimeError):
    """A cache was used outside its contract: more calls than planned steps, approximate before update."""


class StepSyncError(DitCacheError, RuntimeError):
    """Ranks that must agree on (branch, step, decision) did not."""


class CollectiveError(DitCacheError, RuntimeError):
    """A collective did not complete in time or failed: a peer rank diverged, raised or died.

    ``cause`` says which in words ("timed out after 20 s", "a peer closed its connection: ..."), so
    messages built on top of this one keep it.
    """

    def __init__(self, message: str, cause: str = "") -> None:
        super().__init__(message)
        self.cause = cause


class RendezvousError(CollectiveError):
    """The job's ranks did not all join its process group in time (the message names the missing ones)."""


class RequestMismatchError(DitCacheError, ValueError):
    """Ranks that serve one job were given different requests (seed, steps, guidance, params, ...)."""


class LayoutMismatchError(DitCacheError, ValueError):
    """Ranks of one job parsed different parallel layouts (cfg or sp degree, world size)."""
