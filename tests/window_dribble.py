"""Run by test_window inside a network namespace of its own (``unshare -n``),
with tcp_rmem[2] at 1 GiB, a 10G tuning that makes the kernel offer window
scale 14: a narrow listener, one accepted socket, a client dribbling 100-byte
segments into it for 3 s. Prints, as JSON, the window scale, the receive
memory and buffer the queued socket reached, then opens the window and reads
everything, 8 MiB more included.

argv: the repository root; "bare" (the narrowing of 5abb699: the listener's
buffer unlocked, no clamp, the accepted socket not locked again), "clamp"
(window.narrow_listener alone) or "hold" (gatekeeper's: window.narrow_listener,
then window.hold_narrow). Loopback runs at an Ethernet MTU (1500), where small
segments cost the most buffer each."""

import json
import socket
import struct
import subprocess
import sys
import threading
import time

sys.path.insert(0, sys.argv[1])
from gatekeeper.net import window

hold = sys.argv[2] == "hold"
SO_MEMINFO = 55
subprocess.run(["ip", "link", "set", "lo", "up", "mtu", "1500"], check=True)
with open("/proc/sys/net/ipv4/tcp_rmem", "w") as f:
    f.write("4096 131072 1073741824\n")
L = socket.socket()
if sys.argv[2] == "bare":  # the narrowing of 5abb699: no clamp, no hold
    L.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, window.DEFAULT_QUEUED_WINDOW)
    window.receive_lock(L, False)
else:
    window.narrow_listener(L, window.DEFAULT_QUEUED_WINDOW)
L.bind(("127.0.0.1", 0))
L.listen(8)
c = socket.create_connection(L.getsockname())
c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
c.setblocking(False)
s, _ = L.accept()
if hold:
    window.hold_narrow(s)
locks = s.getsockopt(socket.SOL_SOCKET, window.SO_BUF_LOCK)
scale = s.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 8)[6] >> 4
sent = 0
deadline = time.monotonic() + 3
while time.monotonic() < deadline:
    try:
        sent += c.send(b"x" * 100)
    except BlockingIOError:
        time.sleep(0.001)
mem = struct.unpack("9I", s.getsockopt(socket.SOL_SOCKET, SO_MEMINFO, 36))[0]
rcvbuf = s.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF)
window.open_window(s)
c.setblocking(True)
t0 = time.monotonic()
more = 8 << 20


def rest() -> None:
    c.sendall(b"y" * more)
    c.shutdown(socket.SHUT_WR)


threading.Thread(target=rest, daemon=True).start()
got = 0
while True:
    b = s.recv(1 << 20)
    if not b:
        break
    got += len(b)
print(json.dumps({"locks": locks, "scale": scale, "queued_memory": mem, "rcvbuf": rcvbuf,
                  "sent": sent, "read": got, "total": sent + more,
                  "open_read_s": time.monotonic() - t0}))
