"""The streaming core, one module per step of the data path, read top to bottom:

1. :mod:`~server.stream.listener`: where committed task states enter the process (the LISTEN
   connection, behind the :class:`~server.stream.listener.ChangeSource` interface);
2. :mod:`~server.stream.registry`: which mailboxes watch which task or owner, the limits, and the
   :class:`~server.stream.registry.Lease` that owns one stream's subscription;
3. :mod:`~server.stream.mailbox`: one client's pending states, one slot per task;
4. :mod:`~server.stream.encoder`: every SSE byte the server writes;
5. :mod:`~server.stream.session`: one open stream, from its first write to its close (and the
   direct write of a single-task stream's progress to its socket);
6. :mod:`~server.stream.routes`: the SSE endpoints, which decide whether a stream opens and
   what it starts with, then hand it to a session.

With ``TASKSTREAM_NATS_URL``, step 1 is the NATS bus instead: :mod:`~server.stream.bus` (this
process's subscriptions, only to what it watches), :mod:`~server.stream.relay` (the one process
of the fleet that holds the LISTEN connection and publishes each change) and
:mod:`~server.stream.subjects` (subject names). They import the listener, nothing after it.

Beside them: :mod:`~server.stream.snapshots` (batched reads of the current rows) and
:mod:`~server.stream.observe` (stream metrics, open/close logs and close reasons).

Imports go one way: the registry imports the mailbox; the listener, mailbox, encoder, snapshots
and observe import none of the others (the registry knows the listener only as the
``ChangeSource`` interface, and :mod:`server.app` connects the two); the session uses the
registry's lease, the encoder and observe; the routes, at the end of the path, use them all and
are the session's only user. ``tests/test_layout.py`` checks this and that ``server/`` has no
import cycle.
"""
