"""A server's connections: each held by an event loop until its request has arrived, then a thread each.

A client that connects and sends nothing, or a byte a second, must not cost a thread: with a
thread per connection and a cap on them, a hundred such sockets fill it until they time out. So
asyncio's event loop (callbacks, no coroutines) accepts each connection and holds it, a
socket, its bytes so far and a timer, until its headers and the body they announce are in
(request_arrived), the client closes, or the timeout passes; only then does a thread of its
own answer it, an http.server handler reading the bytes already received (RequestReader)
before the socket's, all by one deadline. At the cap the connection that has sent least for
longest is closed for the newcomer; only when every connection is being answered is a
newcomer refused (503). The cap comes from the open files, one per connection (open_files).

    server = Server(config, Handler, log)   # config: host, port, timeout, max_connections;
                                            # Handler(arriving, server) answers in a thread
    server.serve_forever()                  # until shutdown() from another thread, or a signal
    server.server_close()                   # every connection still open fails at once

serve.py's Handler answers the requests; docs/playground.md says why this design and what it costs.
"""

import asyncio
import contextlib
import errno
import io
import ipaddress
import json
import os
import socket
import threading
import time
import traceback

MAX_BODY_BYTES = 1 << 20  # a request body, before it is even parsed
RETRY_AFTER = "1"  # seconds a 503 for a full server asks a client to wait: connections come and go that often
MAX_CONNECTIONS = 4096  # --max_connections=0: as many as the open files allow, up to this (the listen backlog's size)
FEW_CONNECTIONS = 8  # fewer than this, and the server refuses to start: a handful of clients each want a few
SPARE_FILES = 32  # open files kept free for the server itself beyond those open at start: a checkpoint, the page
MAX_HEAD_BYTES = 256 * 1024  # a request's bytes held without a blank line before a thread takes over (and refuses it)


def request_arrived(data):
    """Whether data, a connection's first bytes, hold what a thread needs to answer at once:
    the headers and the body their Content-Length announces; or what the thread will refuse
    without reading on (no blank line within MAX_HEAD_BYTES, a length that is no number or
    over MAX_BODY_BYTES). A client that closes early is handed over too (Server.receive)."""
    ends = [i for i in (data.find(b"\n\r\n"), data.find(b"\n\n")) if i >= 0]
    if not ends:
        return len(data) > MAX_HEAD_BYTES
    head = bytes(data[: min(ends)])
    body_start = min(ends) + (3 if min(ends) == data.find(b"\n\r\n") else 2)
    for line in head.split(b"\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":  # the first, as the handler reads it
            value = value.strip()
            if not (value.isdigit() and len(value) <= 18) or int(value) > MAX_BODY_BYTES:
                return True
            return len(data) - body_start >= int(value)
    return True  # no body announced


class Arriving:
    """A connection whose request is still arriving, held by the event loop: a socket, what it
    has sent, since when, and the timer that ends its wait at --timeout. No thread."""

    __slots__ = ("sock", "address", "start", "data", "timer")

    def __init__(self, sock, address):
        self.sock, self.address, self.start, self.data, self.timer = sock, address, time.monotonic(), bytearray(), None


class RequestReader(io.RawIOBase):
    """A connection's bytes: first those the event loop received (Server.receive), then the
    socket's, all due by one deadline: a client that sends its request a byte at a time
    cannot hold a thread longer than one that sends nothing (a socket's own timeout starts
    afresh at every byte). Writes keep the plain timeout."""

    def __init__(self, sock, seconds, received, deadline):
        self.sock, self.seconds, self.deadline = sock, seconds, deadline
        self.received, self.at = memoryview(received), 0

    def readable(self):
        return True

    def readinto(self, buffer):
        if self.at < len(self.received):
            n = min(len(buffer), len(self.received) - self.at)
            buffer[:n] = self.received[self.at : self.at + n]
            self.at += n
            return n
        left = self.deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError("timed out")
        self.sock.settimeout(left)
        try:
            return self.sock.recv_into(buffer)
        finally:
            self.sock.settimeout(self.seconds)


class Server:
    """An HTTP server. An event loop (the standard library's asyncio, with callbacks) accepts
    each connection and holds it, a socket and a timer, until its request has arrived whole;
    only then does the request get a thread of its own, to answer in as handler does (and, in
    serve.py, to stream a generation from). So a client that connects and sends nothing, or a
    byte a second, costs a few hundred bytes and no thread, and hundreds of them leave the
    others served at once. At --max_connections, the connection that has sent least
    for longest is closed for the newcomer; only when every connection is being answered is a
    newcomer refused (503). docs/playground.md says why this design and what it costs."""

    def __init__(self, config, handler, log=print, max_connections=None):
        """Listen on config.host and config.port (serve.py's ServeConfig: its timeout and
        max_connections too); handler(arriving, server), an http.server handler class, answers
        each request in its thread. max_connections: the cap check_open_files worked out; else
        it is worked out here."""
        host, port = config.host, config.port
        family = socket.AF_INET6 if ":" in host else socket.AF_INET  # an IPv6 address such as ::1
        try:
            # the listen backlog: a burst of connects waits there (the kernel caps it at net.core.somaxconn)
            self.socket = socket.create_server((host, port), family=family, backlog=socket.SOMAXCONN)
        except OSError as e:
            why = os.strerror(e.errno) if e.errno else str(e)  # create_server adds the address to strerror
            raise OSError(f"cannot listen on --host={host} --port={port}: {why}") from None
        self.socket.setblocking(False)
        self.server_address = self.socket.getsockname()
        self.host, self.timeout, self.handler = host, config.timeout, handler
        self.log_line = log  # one line to the server's log
        self.max_connections = max_connections or connection_cap(config.max_connections, *open_files())[0]
        try:
            self.loopback = ipaddress.ip_address(host).is_loopback
        except ValueError:
            self.loopback = host == "localhost"
        self.arriving = {}  # socket -> Arriving: the requests still arriving (the loop's own)
        self.answering = set()  # the sockets of the requests being answered, a thread each
        self.lock = threading.Lock()  # guards answering: the threads remove theirs
        self.loop = asyncio.new_event_loop()
        self.done = threading.Event()  # set when serve_forever returns
        self.quiet_until = 0.0  # the warnings: at most one every 10 s

    @property
    def url(self):
        host = self.host
        if host in ("0.0.0.0", "::"):
            host = "127.0.0.1"  # what this machine's browser can open
        return f"http://{f'[{host}]' if ':' in host else host}:{self.server_address[1]}/"

    def open_connections(self):
        with self.lock:
            return len(self.arriving) + len(self.answering)

    # -- the event loop's side: connections whose request is arriving

    def serve_forever(self, signals=()):
        """Accept and serve until shutdown() (from another thread) or one of signals arrives
        (main(): SIGINT and SIGTERM, handled here even where the shell that started us ignores
        them, as a background job's shell ignores SIGINT)."""
        for sig in signals:
            self.loop.add_signal_handler(sig, self.loop.stop)
        self.loop.add_reader(self.socket, self.accept)
        try:
            self.loop.run_forever()
        finally:
            self.loop.remove_reader(self.socket)
            for sig in signals:
                self.loop.remove_signal_handler(sig)
            for arriving in list(self.arriving.values()):
                self.close(arriving)
            self.done.set()

    def shutdown(self):
        """Stop serve_forever, from another thread, and wait until it has returned."""
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.done.wait()

    def server_close(self):
        """Close the listening socket, the loop, and every connection still open: a thread
        blocked writing to a client that reads nothing fails at once."""
        self.socket.close()
        if not self.loop.is_running():
            self.loop.close()
        with self.lock:
            for sock in self.answering:
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)

    def warn(self, message):
        now = time.monotonic()
        if now >= self.quiet_until:  # a flood of refused connects is a line, not a line each
            self.quiet_until = now + 10
            self.log_line(message)

    def accept(self):
        for _ in range(64):  # a burst, several at a wake-up, then the others' turn
            try:
                sock, address = self.socket.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as e:
                if e.errno not in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                    continue  # a connect reset before it was taken: the next
                # out of open files: the connect stays in the backlog, so the loop would wake
                # at once and spin a core; it looks again in a tenth of a second
                self.warn(f"accept: {e.strerror}: new connections wait (--max_connections={self.max_connections})")
                self.loop.remove_reader(self.socket)
                self.loop.call_later(0.1, self.loop.add_reader, self.socket, self.accept)
                return
            self.admit(sock, address)

    def admit(self, sock, address):
        if self.open_connections() >= self.max_connections:
            if not self.arriving:  # every connection is being answered: the newcomer waits its turn
                self.refuse(sock, f"busy: {self.max_connections} connections being answered, this server's limit")
                return
            # the one that has sent least for longest goes: an idle socket, not a normal client
            self.refuse(min(self.arriving.values(), key=lambda a: (len(a.data), a.start)), "closed for a newer connection")
        sock.setblocking(False)
        arriving = Arriving(sock, address)
        arriving.timer = self.loop.call_later(self.timeout, self.hand_over, arriving)  # its thread answers 408
        self.arriving[sock] = arriving
        self.loop.add_reader(sock, self.receive, arriving)

    def receive(self, arriving):
        try:
            chunk = arriving.sock.recv(65536)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:  # reset: nothing to answer
            self.close(arriving)
            return
        arriving.data += chunk
        if not arriving.data:  # connected, and closed without a word
            self.close(arriving)
        elif not chunk or request_arrived(arriving.data):  # whole, or all there will be
            self.hand_over(arriving)

    def release(self, arriving):
        """arriving, no longer the loop's: its reader and timer gone."""
        self.loop.remove_reader(arriving.sock)
        arriving.timer.cancel()
        with self.lock:
            del self.arriving[arriving.sock]

    def close(self, arriving):
        self.release(arriving)
        arriving.sock.close()

    def refuse(self, request, why):
        """503 and close, from the loop itself: no thread, no wait for the request (an Arriving
        one is one closed for a newcomer)."""
        sock = request
        if isinstance(request, Arriving):
            self.release(request)
            sock = request.sock
        n = self.max_connections
        body = json.dumps({"error": f"server: {why} (--max_connections={n}); try again in {RETRY_AFTER} s", "field": "server"})
        head = (
            f"HTTP/1.0 503 Service Unavailable\r\nServer: {self.handler.server_version}\r\n"
            f"Content-Type: application/json; charset=utf-8\r\nContent-Length: {len(body)}\r\n"
            f"Retry-After: {RETRY_AFTER}\r\n\r\n"
        )
        with contextlib.suppress(OSError):
            sock.setblocking(False)  # a socket's buffer takes these few hundred bytes at once
            sock.send((head + body).encode())
            sock.shutdown(socket.SHUT_WR)
            for _ in range(16):  # what it sent, read (a close with bytes unread is a reset, which loses the answer)
                if not sock.recv(65536):
                    break
        sock.close()
        self.warn(f"{n} connections open (--max_connections): {why}")

    # -- the threads' side: requests that have arrived

    def hand_over(self, arriving):
        """arriving's request has come (or its time is up): a thread of its own answers it."""
        self.release(arriving)
        with self.lock:
            self.answering.add(arriving.sock)
        arriving.sock.setblocking(True)  # the handler sets its timeout
        try:
            threading.Thread(target=self.answer, args=(arriving,), daemon=True).start()
        except RuntimeError:  # no thread to be had: as if it had never come
            self.done_with(arriving.sock)

    def answer(self, arriving):
        try:
            self.handler(arriving, self)
        except Exception as e:  # noqa: BLE001 (what escaped a request: one line, not a traceback)
            if not isinstance(e, (ConnectionError, TimeoutError)):  # a client gone or silent: not worth a line
                where = traceback.extract_tb(e.__traceback__)[-1]
                self.log_line(
                    f"{arriving.address[0]}: {type(e).__name__}: {e} ({os.path.basename(where.filename)}:{where.lineno})"
                )
        finally:
            self.done_with(arriving.sock)

    def done_with(self, sock):
        with self.lock:
            self.answering.discard(sock)
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_WR)  # what was written goes out before the close
        sock.close()


# -----------------------------------------------------------------------------
# open files: one per connection


def open_files():
    """(files this process may open, files open now, what the soft limit was before): the soft
    limit raised to the hard one where it can be (macOS starts a process at 256, some Linux
    shells at 1,024, when the hard limit allows far more)."""
    try:
        import resource
    except ImportError:  # Windows: no such limit
        return MAX_CONNECTIONS + 1000, 0, None
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    before = soft
    want = hard if hard != resource.RLIM_INFINITY else MAX_CONNECTIONS + 1000  # macOS: unlimited, but refused
    if soft != resource.RLIM_INFINITY and soft < want:
        with contextlib.suppress(ValueError, OSError):  # macOS refuses more than kern.maxfilesperproc
            resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
    soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    try:
        in_use = len(os.listdir("/proc/self/fd" if os.path.isdir("/proc/self/fd") else "/dev/fd"))
    except OSError:
        in_use = 64
    files = soft if soft != resource.RLIM_INFINITY else MAX_CONNECTIONS + 1000
    return files, in_use, before


def connection_cap(max_connections, files, in_use, before=None):
    """(the connections to serve at once, the open files the server keeps for itself): what
    --max_connections asks, or MAX_CONNECTIONS, within the files left when the server's own
    are counted."""
    own = in_use + SPARE_FILES
    return max(0, min(max_connections or MAX_CONNECTIONS, files - own)), own


def check_open_files(config):
    """(the connection cap for config's max_connections, a line that says the figures); an error
    where the open files cannot serve even a handful of clients."""
    files, in_use, before = open_files()
    cap, own = connection_cap(config.max_connections, files, in_use)
    if cap < FEW_CONNECTIONS:
        raise ValueError(
            f"this process may open {files:,} files (ulimit -n) and needs {own + FEW_CONNECTIONS:,}: {own:,} for "
            f"the server itself and {FEW_CONNECTIONS} for connections at the least; raise it (ulimit -n 4096)"
        )
    raised = f" (raised from {before:,})" if before is not None and before < files else ""
    asked = f" of the {config.max_connections:,} asked" if config.max_connections > cap else ""
    return cap, (
        f"open files: {files:,}{raised}; connections: {cap:,} at once{asked} (--max_connections), "
        f"{own:,} files kept for the server"
    )
