"""Domain exceptions of the CNI side, and the one place that maps them to CNI error codes.

Everything below the edges (parsing, allocation, netlink, the service) raises one of these; the
edges (`cni.plugin` on stdout, `cni.service` on its socket) turn an exception into the spec's
error JSON through `cni_code`. Nothing else in the tree knows a numeric code.

Standard library only, and nothing imported at all: the plugin loads this on every call.
"""


class CniFailure(Exception):
    """Base of every error the CNI path raises on purpose; the message is what the runtime shows."""

    def __init__(self, msg: str, details: str = ""):
        super().__init__(msg)
        self.msg = msg
        self.details = details


# ---- bad input: the runtime (or the person who wrote the config) must change something

class IncompatibleVersion(CniFailure):
    """The cniVersion is not one we speak, or the command does not exist in that version."""


class UnsupportedField(CniFailure):
    """The network config holds a field this plugin does not understand."""


class InvalidEnvironment(CniFailure):
    """A CNI_* environment variable is missing or malformed."""


class DecodingFailure(CniFailure):
    """stdin (or the service's answer) is not valid JSON."""


class InvalidNetworkConfig(CniFailure):
    """The network config parses as JSON but a field has the wrong type or value."""


# ---- the container, the host and our own state

class ContainerNotFound(CniFailure):
    """The network namespace named by CNI_NETNS does not exist (nothing was made)."""


class StateFailure(CniFailure):
    """The allocation records could not be read or written (I/O, corrupt file)."""


class ServiceUnavailable(CniFailure):
    """The warm service in the daemon cannot be reached; the runtime should retry."""


class NotReady(CniFailure):
    """STATUS: the daemon is not ready, or the subnet file is missing."""


class PoolExhausted(CniFailure):
    """Every address of the host's subnet is allocated."""


class AttachmentDrift(CniFailure):
    """CHECK found the attachment differing from what ADD made."""


class InterfaceConflict(CniFailure):
    """CNI_IFNAME already exists in the container and is not ours."""


class AddressUnavailable(CniFailure):
    """The requested address cannot be had: taken here, claimed by another host, or no
    container's address at all (a VTEP, gateway or broadcast address, or outside the network)."""


class KernelFailure(CniFailure):
    """A netlink request failed for a reason other than 'already there' or 'already gone'."""


class PermissionDenied(CniFailure):
    """The service was called by a process that is not root."""


# Well-known codes from the CNI spec (1.1.0), then our own from 100 up.
_CODES = (
    (IncompatibleVersion, 1),
    (UnsupportedField, 2),
    (ContainerNotFound, 3),
    (InvalidEnvironment, 4),
    (StateFailure, 5),
    (DecodingFailure, 6),
    (InvalidNetworkConfig, 7),
    (ServiceUnavailable, 11),
    (NotReady, 50),
    (PoolExhausted, 100),
    (AttachmentDrift, 101),
    (InterfaceConflict, 102),
    (AddressUnavailable, 103),
    (KernelFailure, 110),
    (PermissionDenied, 111),
)
INTERNAL_ERROR_CODE = 999


def cni_code(exc: BaseException) -> int:
    """The CNI error code for an exception; anything unexpected is an internal error (999)."""
    for kind, code in _CODES:
        if isinstance(exc, kind):
            return code
    return INTERNAL_ERROR_CODE
