"""One error hierarchy for vqscope.

Every message says what went wrong, where (device, queue, field, value) and,
where it helps, what to do. Every exception vqscope raises on purpose is an
:class:`InspectorError`; the classes defined beside the code that raises
them are listed here too, so that this is the whole tree::

    InspectorError
    ├── LayoutError (also ValueError)      queue size / alignment (VIRTIO 1.2 §2.7)
    ├── ArgumentError (also ValueError)    a caller's argument refused (bounds, C iovec space)
    ├── MemoryAccessError                  an address outside every region; SIGBUS on guest memory
    ├── RingError                          a ring that cannot be decoded or serviced (queue broken)
    ├── ProtocolError                      a vhost-user message breaking the spec
    │   └── vhost_user.protocol.ProtocolViolation   ... naming request, field, value
    ├── RequestRefused                     a request the back-end did not carry out (REPLY_ACK != 0)
    ├── datapath.iotlb.IotlbRejected       an IOTLB UPDATE/INVALIDATE refused (field, value, why)
    ├── datapath.iotlb.IotlbMiss           an IOVA range with no IOTLB translation (yet)
    ├── vhost_user.proxy_link.LinkClosed   a peer of `vqscope proxy` hung up or failed (link closed)
    ├── DeviceError                        a device asked for what it does not have
    ├── SnapshotFormatError                a Snapshot JSON object that breaks the contract
    ├── SourceError                        a source that cannot be read
    │   ├── SourceGone                     ... that was attached and went away (exit status 1)
    │   │   └── memory.process.ProcessExitedError
    │   ├── memory.process.NoSuchProcessError, ProcessAccessError, ProcessReadError
    │   └── sources.qemu.qmp.QmpCommandError     QEMU answered a QMP command with an error
    ├── recording.reader.RecordingError    a recording file that cannot be read (a bad part named)
    ├── recording.codec.CodecError         a snapshot delta or event block that does not decode
    ├── record.writer.RecordError          a recording that cannot be written
    │   └── record.writer.DiskFullError
    ├── record.export.ExportError          an export that cannot be written
    ├── tools.vhost_net_load.VhostNetError the kernel's vhost-net refused the load tool
    ├── probes.base.ProbeError             a probe that cannot be built or attached
    │   └── probes.base.PrivilegeError     ... for want of CAP_BPF / CAP_PERFMON
    └── probes.btf.BtfError                BTF that cannot be read
"""


class InspectorError(Exception):
    """Root of every error vqscope raises on purpose."""


class LayoutError(InspectorError, ValueError):
    """A queue size or alignment that VIRTIO 1.2 §2.7 does not allow."""


class ArgumentError(InspectorError, ValueError):
    """An argument a vqscope function refuses (a bound out of range, an
    iovec array too small for the C data path): a caller's mistake, not the
    peer's."""


class MemoryAccessError(InspectorError):
    """An address (guest-physical or front-end virtual) outside every region."""


class RingError(InspectorError):
    """A ring that cannot be decoded at all (e.g. its areas are unmapped)."""


class ProtocolError(InspectorError):
    """A vhost-user message that breaks the spec; the connection is broken."""


class SourceError(InspectorError):
    """A source (introspection socket, QMP, process) that cannot be read."""


class SourceGone(SourceError):
    """A source that was attached and went away (QEMU exited, its monitor
    closed, a back-end stopped): ``vqscope snapshot`` exits with status 1 on
    it, not 2, and the TUI shows the source as gone."""


class RequestRefused(InspectorError):
    """A vhost-user request the back-end did not carry out although the
    front-end broke no rule (the device refused a config write): a
    REPLY_ACK answers it non-zero and the connection lives on."""


class DeviceError(InspectorError):
    """A device that cannot do what the back-end core asks of it (a config
    space it does not have, an inflight area it does not take, a queue it
    cannot service)."""


class SnapshotFormatError(InspectorError):
    """A Snapshot JSON object (README.md, "Snapshot JSON") that breaks the
    contract: a member missing or of the wrong type, an unknown anomaly
    kind. Names the member (``queues[1].chains[0].head``) and its value."""
