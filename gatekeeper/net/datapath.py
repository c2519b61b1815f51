"""A running job's bytes, both ways, on whichever data path the server has.

`move_bytes` is the one place that picks the path -- the zero-copy `Relay`
(Linux: splice(2) through pipes, every job on one epoll set) or the portable
`copy.copy_both_ways` (a task per direction) -- and the one place that makes sure a
failed job's peers each see a reset, never a clean end after half a reply.
Both proxy jobs and relayed inetd jobs come through here.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import trio

from gatekeeper.net.copy import Transfer, abort, copy_both_ways
from gatekeeper.net.relay import Relay, RelayJob, Socket
from gatekeeper.outcome import Side

if TYPE_CHECKING:
    from gatekeeper.distcc.protocol import Speaks


def open_on_relay(relay: Relay, client: Socket, backend: Socket,
                  transfer: Transfer, *, speaks: Speaks,
                  on_complete: Callable[[], None] | None = None) -> RelayJob:
    """Start a job on the relay the way its protocol needs (the reply prefix it
    parses, whether the backend's EOF hands the slot off). Used at admission
    (`ProxyJobs.start_at_admission`) and by `move_bytes` when that did not
    happen, so both start a job the same way."""
    return relay.open(client, backend, transfer, reply_prefix=speaks.reply_prefix,
                      on_complete=on_complete,
                      hand_off_at_backend_eof=speaks.hand_off_at_backend_eof)


async def move_bytes(stream: trio.SocketStream, backend: trio.SocketStream,
                     transfer: Transfer, *, relay: Relay | None, speaks: Speaks,
                     idle_timeout: float | None, moving: RelayJob | None = None,
                     on_complete: Callable[[], None] | None = None) -> Transfer:
    """Move the job's bytes both ways until done, recording them in `transfer`
    (`moving`: already started on the relay at admission; `on_complete`: see
    `Relay.open`). On failure make sure each peer sees a reset. Closes neither
    stream."""
    try:
        if relay is not None:
            if moving is None:
                moving = open_on_relay(relay, stream.socket, backend.socket, transfer,
                                       speaks=speaks, on_complete=on_complete)
            await relay.wait(moving, idle_timeout)
        else:
            await copy_both_ways(stream, backend, transfer, reply_prefix=speaks.reply_prefix,
                         idle_timeout=idle_timeout)
    except OSError as e:  # no fds left for the splice's pipes (EMFILE, ENFILE)
        transfer.failed = Side.BACKEND
        transfer.error = f"cannot relay: {e}"
    except BaseException:
        # Cancelled (the drain deadline) or a bug: the job is cut off.
        abort(stream)
        abort(backend)
        raise
    finally:
        if transfer.idle:
            abort(stream)
            abort(backend)
        elif transfer.failed is Side.BACKEND:
            abort(stream)
        elif transfer.failed is Side.CLIENT:
            abort(backend)
    return transfer
