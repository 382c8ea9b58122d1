"""Domain exceptions shared by the daemon, the CLI and the CNI service.

Each boundary (etcd, netlink, config parsing) translates what it sees into one of these, so the
callers decide on meaning (retry, refuse, exit) without knowing a library's exception types.
"""


class OverlayError(Exception):
    """Base of every error this project raises on purpose."""


class ConfigError(OverlayError, ValueError):
    """A network config that cannot be used; the message names the field."""

    def __init__(self, field: str, problem: str):
        super().__init__(f"{field}: {problem}")
        self.field = field
        self.problem = problem


class LeaseParseError(OverlayError, ValueError):
    """A subnet key or lease value in etcd that is not in flannel's format."""


class SubnetsExhausted(OverlayError):
    """Every subnet between SubnetMin and SubnetMax is leased."""


class StoreUnavailable(OverlayError):
    """etcd could not be reached on any endpoint (transient: retry with backoff)."""


class WatchCompacted(OverlayError):
    """The revision a watch resumes from was compacted away: re-list, then watch again."""

    def __init__(self, compact_revision: int):
        super().__init__(f"watch revision compacted (compact revision {compact_revision})")
        self.compact_revision = compact_revision


class KernelError(OverlayError):
    """A netlink operation failed for a reason other than 'already there' or 'already gone'."""


class DeviceNotFound(KernelError):
    """A network device named in a request does not exist."""


class StoreError(OverlayError):
    """etcd refused a request for a reason retrying will not cure (bad request, permission)."""


class LeaseLost(OverlayError):
    """Our etcd lease expired or our subnet key is now bound to another lease: claim again."""


class ClaimParseError(OverlayError, ValueError):
    """An address claim key or value in etcd that is not in our format."""
