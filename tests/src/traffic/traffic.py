# Traffic server and clients of mesh-testbed (see traffic/mod.rs).
#
#   server <port> <banner_port>
#   upload <host> <port> <bytes> <seed>
#   download <host> <port> <bytes> <seed> [<verify_seed>]
#   halfclose <host> <port> <bytes>
#   banner <host> <port>
#   expect-reset <host> <port>
#   client-reset <host> <port> <tag>
#   peer <host> <port>
#   getpeername <host> <port>
#   concurrent <host> <port> <connections> <bytes_each>
#   small-writes <host> <port> <writes>
#   connect <host> <port> <timeout_s>
#
# Clients print `result <what> ...` lines on success; on failure they print
# `FAIL: <reason>` to stderr and exit 1. Python stdlib only.

import errno
import hashlib
import json
import os
import random
import resource
import selectors
import socket
import struct
import sys
import threading
import time
import traceback

# The Python-level hook reads source lines through linecache, where the
# bootstrap put this script (the built-in one only reads files).
sys.excepthook = traceback.print_exception

CHUNK = 1 << 18
CONNECT_TIMEOUT = 10.0
IO_TIMEOUT = 30.0
BANNER = b"BANNER mesh-testbed server-first\n"


def fail(msg):
    sys.stdout.flush()
    sys.stderr.write("FAIL: %s\n" % msg)
    sys.stderr.flush()
    os._exit(1)


def raise_nofile():
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return hard


def stream(n, seed):
    """n deterministic pseudo-random bytes, in chunks of CHUNK."""
    r = random.Random(seed)
    while n > 0:
        k = min(CHUNK, n)
        yield r.randbytes(k)
        n -= k


def family(host):
    return socket.AF_INET6 if ":" in host else socket.AF_INET


def show(host, port):
    return "[%s]:%d" % (host, port) if ":" in host else "%s:%d" % (host, port)


def dial(host, port, timeout=CONNECT_TIMEOUT, what=""):
    s = socket.socket(family(host), socket.SOCK_STREAM)
    s.settimeout(timeout)
    try:
        s.connect((host, port))
    except OSError as e:
        fail("%sconnect to %s: %r" % (what, show(host, port), e))
    s.settimeout(IO_TIMEOUT)
    return s


def recv_all(s, limit=1 << 20):
    out = bytearray()
    while True:
        d = s.recv(65536)
        if not d:
            return bytes(out)
        out += d
        if len(out) > limit:
            fail("reply longer than %d bytes: %s" % (limit, preview(out)))


def recv_line(s, limit=4096):
    out = bytearray()
    while not out.endswith(b"\n"):
        d = s.recv(1)
        if not d:
            fail("EOF before end of line; got %s" % preview(out))
        out += d
        if len(out) > limit:
            fail("line longer than %d bytes: %s" % (limit, preview(out)))
    return bytes(out)


def preview(b, limit=120):
    """repr of the start of b, for messages."""
    b = bytes(b)
    if len(b) <= limit:
        return repr(b)
    return "%r... (%d bytes)" % (b[:limit], len(b))


def first_diff(a, b):
    for i in range(min(len(a), len(b))):
        if a[i] != b[i]:
            return i
    return min(len(a), len(b))


# ---------------------------------------------------------------- server


def server(port, banner_port):
    raise_nofile()
    threading.stack_size(256 * 1024)
    stats = {
        "connections": 0,
        "active": 0,
        "max_active": 0,
        "resets_observed": 0,
        "eofs_observed": 0,
        "errors": 0,
    }
    lock = threading.Lock()
    out_lock = threading.Lock()

    def log(line):
        with out_lock:
            sys.stdout.write(line + "\n")
            sys.stdout.flush()

    def count(key, d=1):
        with lock:
            stats[key] += d
            if stats["active"] > stats["max_active"]:
                stats["max_active"] = stats["active"]

    def read_command(c):
        buf = b""
        while b"\n" not in buf:
            d = c.recv(4096)
            if not d:
                if buf:
                    raise ValueError("EOF inside command line %r" % buf[:100])
                return None, b""
            buf += d
            if len(buf) > 4096:
                raise ValueError("command line too long: %r..." % buf[:100])
        line, rest = buf.split(b"\n", 1)
        return line.decode("ascii", "replace").split(), rest

    def echo(c, rest):
        if rest:
            c.sendall(rest)
        while True:
            d = c.recv(65536)
            if not d:
                return
            c.sendall(d)

    def drain(c, buf):
        """Reads until EOF; returns the byte count. Raises on reset."""
        n = 0
        while True:
            k = c.recv_into(buf)
            if k == 0:
                return n
            n += k

    def handle(c, peer, banner):
        op = "BANNER" if banner else "?"
        try:
            if banner:
                c.sendall(BANNER)
                echo(c, b"")
                return
            cmd, rest = read_command(c)
            if cmd is None:
                return  # connected and closed without a command
            op = cmd[0] if cmd else ""
            if op == "ECHO":
                echo(c, rest)
            elif op == "SINK":
                h = hashlib.sha256(rest)
                n = len(rest)
                buf = bytearray(1 << 20)
                mv = memoryview(buf)
                while True:
                    k = c.recv_into(buf)
                    if k == 0:
                        break
                    h.update(mv[:k])
                    n += k
                c.sendall(b"%d %s\n" % (n, h.hexdigest().encode()))
            elif op == "SOURCE":
                for chunk in stream(int(cmd[1]), int(cmd[2])):
                    c.sendall(chunk)
            elif op == "HALFCLOSE":
                n = len(rest) + drain(c, bytearray(65536))
                c.sendall(b"got %d bytes\n" % n)
            elif op == "RESET":
                # Closed in `finally`: with linger 0 that sends an RST.
                c.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            elif op == "PEER":
                c.sendall(("%s %d\n" % (peer[0], peer[1])).encode())
            elif op == "EXPECTRESET":
                tag = cmd[1]
                c.sendall(b"armed\n")
                n = len(rest)
                try:
                    n += drain(c, bytearray(65536))
                except ConnectionResetError:
                    count("resets_observed")
                    log("reset-observed %s %d" % (tag, n))
                    return
                count("eofs_observed")
                log("eof-observed %s %d" % (tag, n))
            elif op == "STATS":
                with lock:
                    snapshot = dict(stats)
                c.sendall((json.dumps(snapshot) + "\n").encode())
            else:
                count("errors")
                log("error unknown command %r from %r" % (cmd, peer))
                c.sendall(b"ERR unknown command\n")
        except Exception as e:
            count("errors")
            log("error %s from %r: %r" % (op, peer, e))
        finally:
            count("active", -1)
            c.close()

    def accept_loop(s, banner):
        while True:
            try:
                c, peer = s.accept()
            except OSError as e:
                count("errors")
                log("error accept: %r" % e)
                time.sleep(0.01)  # back off (EMFILE...), not synchronisation
                continue
            count("connections")
            count("active")
            try:
                threading.Thread(target=handle, args=(c, peer, banner), daemon=True).start()
            except Exception as e:
                count("active", -1)
                count("errors")
                log("error thread: %r" % e)
                c.close()

    def listen(fam, addr, p):
        s = socket.socket(fam, socket.SOCK_STREAM)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if fam == socket.AF_INET6:
            s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        s.bind((addr, p))
        s.listen(4096)
        return s

    for p, banner in ((port, False), (banner_port, True)):
        for fam, addr in ((socket.AF_INET, "0.0.0.0"), (socket.AF_INET6, "::")):
            s = listen(fam, addr, p)
            threading.Thread(target=accept_loop, args=(s, banner), daemon=True).start()
    log("ready %d %d" % (port, banner_port))
    threading.Event().wait()


# ---------------------------------------------------------------- clients


def upload(host, port, n, seed):
    s = dial(host, port)
    s.sendall(b"SINK %d\n" % n)
    h = hashlib.sha256()
    for chunk in stream(n, seed):
        s.sendall(chunk)
        h.update(chunk)
    s.shutdown(socket.SHUT_WR)
    raw = recv_all(s)
    reply = raw.decode("ascii", "replace").split()
    if len(reply) != 2:
        fail("bad SINK reply %s" % preview(raw))
    if int(reply[0]) != n:
        fail("server received %s bytes, client sent %d" % (reply[0], n))
    if reply[1] != h.hexdigest():
        fail("server sha256 %s != client sha256 %s (%d bytes)" % (reply[1], h.hexdigest(), n))
    print("result upload %d %s" % (n, reply[1]))


def download(host, port, n, seed, verify_seed=None):
    # verify_seed (tests of the verifier only): expect another stream.
    s = dial(host, port)
    s.sendall(b"SOURCE %d %d\n" % (n, seed))
    expected = stream(n, seed if verify_seed is None else verify_seed)
    want_h = hashlib.sha256()
    got_h = hashlib.sha256()
    pending = memoryview(b"")
    got = 0
    buf = bytearray(1 << 20)
    mv = memoryview(buf)
    while True:
        k = s.recv_into(buf)
        if k == 0:
            break
        data = mv[:k]
        got_h.update(data)
        off = 0
        while off < k:
            if not pending:
                chunk = next(expected, None)
                if chunk is None:
                    fail("server sent more than the %d bytes asked for" % n)
                want_h.update(chunk)
                pending = memoryview(chunk)
            m = min(len(pending), k - off)
            if data[off : off + m] != pending[:m]:
                i = first_diff(bytes(data[off : off + m]), bytes(pending[:m]))
                fail("byte %d of the download differs from the generator" % (got + off + i))
            pending = pending[m:]
            off += m
        got += k
    if got != n:
        fail("downloaded %d bytes, expected %d (early EOF)" % (got, n))
    if got_h.hexdigest() != want_h.hexdigest():
        fail("sha256 %s != expected %s" % (got_h.hexdigest(), want_h.hexdigest()))
    print("result download %d %s" % (got, got_h.hexdigest()))


def halfclose(host, port, n):
    s = dial(host, port)
    s.sendall(b"HALFCLOSE\n")
    for chunk in stream(n, n):
        s.sendall(chunk)
    s.shutdown(socket.SHUT_WR)
    reply = recv_all(s)
    want = b"got %d bytes\n" % n
    if reply != want:
        fail("after shutdown(SHUT_WR) expected %r, got %s" % (want, preview(reply)))
    print("result halfclose %d" % n)


def banner(host, port):
    s = dial(host, port)
    s.settimeout(5.0)
    try:
        line = recv_line(s)
    except socket.timeout:
        fail("no banner within 5 s of connecting (client sent nothing)")
    if line != BANNER:
        fail("banner %s, expected %r" % (preview(line), BANNER))
    s.sendall(b"ping\n")
    pong = recv_line(s)
    if pong != b"ping\n":
        fail("after banner, echo %s, expected %r" % (preview(pong), b"ping\n"))
    s.shutdown(socket.SHUT_WR)
    rest = recv_all(s)
    if rest:
        fail("unexpected data before EOF: %s" % preview(rest))
    print("result banner")


def expect_reset(host, port):
    s = dial(host, port)
    s.settimeout(10.0)
    s.sendall(b"RESET\n")
    try:
        d = s.recv(65536)
    except ConnectionResetError:
        print("result expect-reset")
        return
    except socket.timeout:
        fail("neither data, EOF nor reset within 10 s")
    if not d:
        fail("clean EOF (FIN) instead of a reset")
    fail("got data %s instead of a reset" % preview(d))


def client_reset(host, port, tag):
    s = dial(host, port)
    s.sendall(b"EXPECTRESET %s\n" % tag.encode())
    armed = recv_line(s)
    if armed != b"armed\n":
        fail("expected %r, got %s" % (b"armed\n", preview(armed)))
    s.sendall(b"x" * 1000)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    s.close()
    print("result client-reset %s" % tag)


def peer(host, port):
    s = dial(host, port)
    local = s.getsockname()
    s.sendall(b"PEER\n")
    raw = recv_all(s)
    reply = raw.decode("ascii", "replace").split()
    if len(reply) != 2:
        fail("bad PEER reply %s" % preview(raw))
    print("result peer %s %s local %s %d" % (reply[0], reply[1], local[0], local[1]))


def getpeername(host, port):
    s = dial(host, port)
    p = s.getpeername()
    local = s.getsockname()
    s.close()
    print("result getpeername %s %d local %s %d" % (p[0], p[1], local[0], local[1]))


class Conn:
    __slots__ = ("i", "sock", "out", "sent", "want", "got")


def concurrent(host, port, n, each):
    hard = raise_nofile()
    if n + 64 > hard:
        fail("%d connections need more than the RLIMIT_NOFILE hard limit %d" % (n, hard))
    conns = []
    for i in range(n):
        c = Conn()
        c.i = i
        c.sock = dial(host, port, what="connection %d of %d: " % (i, n))
        c.sock.setblocking(False)
        c.want = (b"conn %d;" % i + random.Random(i).randbytes(each))[:each]
        c.out = memoryview(b"ECHO\n" + c.want)
        c.sent = 0
        c.got = bytearray()
        conns.append(c)
    print("all %d connected" % n, flush=True)
    sel = selectors.DefaultSelector()
    for c in conns:
        sel.register(c.sock, selectors.EVENT_READ | selectors.EVENT_WRITE, c)
    left = n
    while left:
        events = sel.select(timeout=IO_TIMEOUT)
        if not events:
            fail("stalled for %ss with %d of %d echoes incomplete" % (IO_TIMEOUT, left, n))
        for key, mask in events:
            c = key.data
            if mask & selectors.EVENT_WRITE and c.sent < len(c.out):
                try:
                    c.sent += c.sock.send(c.out[c.sent : c.sent + 65536])
                except BlockingIOError:
                    pass
                except OSError as e:
                    fail("connection %d: send: %r" % (c.i, e))
                if c.sent == len(c.out):
                    sel.modify(c.sock, selectors.EVENT_READ, c)
            if mask & selectors.EVENT_READ:
                try:
                    d = c.sock.recv(65536)
                except BlockingIOError:
                    continue
                except OSError as e:
                    fail("connection %d: recv after %d bytes: %r" % (c.i, len(c.got), e))
                if not d:
                    fail("connection %d: EOF after %d of %d bytes" % (c.i, len(c.got), each))
                c.got += d
                if len(c.got) > each:
                    fail("connection %d: %d bytes echoed, sent %d" % (c.i, len(c.got), each))
                if len(c.got) == each:
                    if bytes(c.got) != c.want:
                        fail("connection %d: echo differs at byte %d" % (c.i, first_diff(c.got, c.want)))
                    sel.unregister(c.sock)
                    left -= 1
    # Every echo came back while all n connections were open; now close.
    for c in conns:
        try:
            c.sock.getpeername()
            c.sock.shutdown(socket.SHUT_WR)
        except OSError as e:
            fail("connection %d: no longer connected after its echo: %r" % (c.i, e))
        sel.register(c.sock, selectors.EVENT_READ, c)
    left = n
    while left:
        events = sel.select(timeout=IO_TIMEOUT)
        if not events:
            fail("%d of %d connections got no EOF within %ss" % (left, n, IO_TIMEOUT))
        for key, _ in events:
            c = key.data
            try:
                d = c.sock.recv(65536)
            except BlockingIOError:
                continue
            except OSError as e:
                fail("connection %d: recv waiting for EOF: %r" % (c.i, e))
            if d:
                fail("connection %d: unexpected data %s before EOF" % (c.i, preview(d)))
            sel.unregister(c.sock)
            c.sock.close()
            left -= 1
    print("result concurrent %d %d" % (n, each))


def small_writes(host, port, writes):
    s = dial(host, port)
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    s.sendall(b"ECHO\n")
    pieces = [b"%d;" % i for i in range(writes)]
    want = b"".join(pieces)
    got = bytearray()
    err = []

    def reader():
        try:
            while True:
                d = s.recv(65536)
                if not d:
                    return
                got.extend(d)
        except OSError as e:
            err.append(e)

    t = threading.Thread(target=reader, daemon=True)
    t.start()
    for p in pieces:
        s.sendall(p)
    s.shutdown(socket.SHUT_WR)
    t.join(IO_TIMEOUT)
    if t.is_alive():
        fail("no EOF within %ss; %d of %d bytes echoed" % (IO_TIMEOUT, len(got), len(want)))
    if err:
        fail("recv failed after %d of %d bytes: %r" % (len(got), len(want), err[0]))
    if bytes(got) != want:
        i = first_diff(got, want)
        fail(
            "echo of %d writes differs at byte %d (got %d bytes, want %d): %s vs %s"
            % (writes, i, len(got), len(want), preview(got[i : i + 40]), preview(want[i : i + 40]))
        )
    print("result small-writes %d %d" % (writes, len(want)))


def connect(host, port, timeout):
    s = socket.socket(family(host), socket.SOCK_STREAM)
    s.settimeout(timeout)
    try:
        s.connect((host, port))
        outcome = "connected"
    except ConnectionRefusedError:
        outcome = "refused"
    except PermissionError:
        outcome = "permission-denied"
    except ConnectionResetError:
        outcome = "reset"
    except (socket.timeout, TimeoutError):
        outcome = "timed-out"
    except OSError as e:
        if e.errno in (errno.EHOSTUNREACH, errno.ENETUNREACH):
            outcome = "unreachable"
        else:
            fail("connect to %s: %r" % (show(host, port), e))
    s.close()
    print("result connect %s" % outcome)


def main():
    if len(sys.argv) < 2:
        fail("usage: <command> args...")
    cmd, args = sys.argv[1], sys.argv[2:]
    if cmd == "server":
        server(int(args[0]), int(args[1]))
        return
    host, port = args[0], int(args[1])
    rest = args[2:]
    if cmd == "upload":
        upload(host, port, int(rest[0]), int(rest[1]))
    elif cmd == "download":
        download(host, port, int(rest[0]), int(rest[1]), *map(int, rest[2:3]))
    elif cmd == "halfclose":
        halfclose(host, port, int(rest[0]))
    elif cmd == "banner":
        banner(host, port)
    elif cmd == "expect-reset":
        expect_reset(host, port)
    elif cmd == "client-reset":
        client_reset(host, port, rest[0])
    elif cmd == "peer":
        peer(host, port)
    elif cmd == "getpeername":
        getpeername(host, port)
    elif cmd == "concurrent":
        concurrent(host, port, int(rest[0]), int(rest[1]))
    elif cmd == "small-writes":
        small_writes(host, port, int(rest[0]))
    elif cmd == "connect":
        connect(host, port, float(rest[0]))
    else:
        fail("unknown command %r" % cmd)


main()
