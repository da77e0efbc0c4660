"""Raw TCP copy of N bytes: the baseline our protocol's throughput is compared with."""
from __future__ import annotations

import socket
import threading
import time

BUF = 1 << 20


def _serve_sink(listener: socket.socket, nbytes: int, done: dict) -> None:
    conn, _ = listener.accept()
    with conn:
        got = 0
        while got < nbytes:
            data = conn.recv(BUF)
            if not data:
                break
            got += len(data)
        done["bytes"] = got
        done["t_end"] = time.perf_counter()
        conn.sendall(b"k")  # the sender's clock stops when the receiver has everything


def copy_bytes(nbytes: int, host: str = "127.0.0.1", bind: str = "127.0.0.1") -> float:
    """Seconds to send nbytes over a fresh TCP connection, until the receiver holds them all."""
    listener = socket.socket()
    listener.bind((bind, 0))
    listener.listen(1)
    port = listener.getsockname()[1]
    done: dict = {}
    t = threading.Thread(target=_serve_sink, args=(listener, nbytes, done), daemon=True)
    t.start()
    payload = memoryview(bytearray(BUF))
    with socket.create_connection((host, port)) as s:
        t0 = time.perf_counter()
        left = nbytes
        while left > 0:
            n = s.send(payload[: min(BUF, left)])
            left -= n
        s.recv(1)
        elapsed = time.perf_counter() - t0
    t.join()
    listener.close()
    if done.get("bytes") != nbytes:
        raise RuntimeError(f"raw TCP copy delivered {done.get('bytes')} of {nbytes} bytes")
    return elapsed
