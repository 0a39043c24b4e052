"""Introspection of a running vqscope back-end: its snapshot (snapshot.py),
its central event buffer (buffer.py), and the read-only socket protocol that
serves them (server.py) and reads them (client.py).

The introspection protocol
--------------------------
One Unix stream connection per reader, newline-delimited JSON both ways: the
reader sends one request object per line, the server answers each with one
reply line, in order. A request is ``{"op": OP, ...}``; the ops are
``snapshot``, ``messages`` and ``events`` (``server.INTROSPECT_OPS``), and
none of them changes anything. A request that is not JSON, names another op
or has an invalid parameter gets ``{"error": "..."}`` and the connection
stays open.

- ``{"op": "snapshot"}`` returns one snapshot JSON object (README.md,
  "Snapshot JSON"; built by snapshot.py's ``backend_snapshot``); with
  ``"chains": false`` every queue's ``chains`` is ``[]`` and the object
  has ``"chains_omitted": true`` (indices, counters and anomalies only).
- ``{"op": "messages"}`` returns ``{"messages": [...], "next": M,
  "instance": I}``: the back-end's vhost-user message log (recently closed
  connections first, then live ones), each entry with its ``connection`` and
  a server-wide ``seq`` in arrival order; with ``"since": N`` only the
  entries with ``seq >= N``. ``next`` is the seq the next logged message
  will get.
- ``{"op": "events", "since": N}`` (optional ``"limit"``, at most 65536)
  returns ``{"next": M, "head": H, "dropped": D, "gap": G, "events":
  [[time_ns, device, queue, kind, value], ...], "instance": I}``: the timed
  events (inspector/events.py) with sequence number >= N, oldest first
  within a queue (across queues in drain order). ``next`` is the cursor for
  the next call; ``head`` the number the next event will get; ``dropped``
  the events the devices' logs lost (full) since the back-end started;
  ``gap`` the events >= N that left the back-end's bounded buffer before
  this call. With ``"binary": true`` the reply line has ``"chunks":
  [[device, queue, n], ...]`` and ``"binary": B`` instead of ``events``, and
  B bytes of packed records follow the line (16 bytes each: u64 time_ns, u32
  kind code, u32 value; inspector.events.EVENT_RECORD and
  EVENT_KIND_NAMES), chunk after chunk: the server copies them instead of
  encoding each event.

``since`` must be a non-negative integer (the ``next`` of the previous reply,
or 0); one beyond the server's ``next`` (a cursor from an earlier server)
reads from the start. Cursors are the reader's: each reader keeps its own
``since`` per op, so several readers each see every event and message.

Both ``events`` and ``messages`` replies carry ``instance``, a name of the
serving process that changes when the back-end restarts (its sequence
numbers start again at 0): a client holding cursors of an earlier instance
reads the new one from 0.

Access: the socket is created mode 0600, and the server serves only readers
of its own uid and root (SO_PEERCRED) unless told to serve any uid. A reader
whose request line grows past 64 KiB, or who leaves more than 64 MiB of
replies unread, is disconnected; a slow reader never blocks the back-end.
"""
