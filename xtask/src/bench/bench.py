# Load generator and servers for `cargo xtask bench`: plain sockets, no checks
# beyond counts, so the figures measure the path, not the tool.
import socket, sys, threading, time

def serve(port):
    listeners = []
    for family, addr in ((socket.AF_INET, "0.0.0.0"), (socket.AF_INET6, "::")):
        s = socket.socket(family, socket.SOCK_STREAM)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        s.bind((addr, port))
        s.listen(4096)
        listeners.append(s)
    for s in listeners:
        threading.Thread(target=accept_loop, args=(s,), daemon=True).start()
    print("ready", flush=True)
    threading.Event().wait()

def accept_loop(s):
    while True:
        c, _ = s.accept()
        threading.Thread(target=handle, args=(c,), daemon=True).start()

def handle(c):
    with c:
        mode = c.recv(1)
        if mode == b"G":          # HTTP/1.1 keep-alive: one full response per request, one write
            c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            buf = b"G"
            body = b"x" * 1024
            response = b"HTTP/1.1 200 OK\r\ncontent-length: 1024\r\n\r\n" + body
            while True:
                while b"\r\n\r\n" not in buf:
                    k = c.recv(65536)
                    if not k:
                        return
                    buf += k
                _, buf = buf.split(b"\r\n\r\n", 1)
                c.sendall(response)
        elif mode == b"C":          # set-up probe: one byte back, then close
            c.sendall(b"C")
        elif mode == b"R":        # request/response: echo 64-byte messages
            c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            while True:
                buf = b""
                while len(buf) < 64:
                    k = c.recv(64 - len(buf))
                    if not k:
                        return
                    buf += k
                c.sendall(buf)
        elif mode == b"B":        # bulk sink: count to EOF, report
            n = 0
            buf = bytearray(1 << 20)
            while True:
                k = c.recv_into(buf)
                if not k:
                    break
                n += k
            c.sendall(str(n).encode())

def setup(host, port, count):
    """Time from connect() to the first byte back from the server, per connection."""
    samples = []
    for _ in range(count):
        t0 = time.perf_counter()
        c = socket.create_connection((host, port), timeout=5)
        c.sendall(b"C")
        if c.recv(1) != b"C":
            sys.exit("bad reply")
        samples.append(time.perf_counter() - t0)
        c.close()
    samples.sort()
    print("p50_us %.1f p90_us %.1f p99_us %.1f" % (samples[len(samples) // 2] * 1e6, samples[int(len(samples) * 0.9)] * 1e6, samples[int(len(samples) * 0.99)] * 1e6))

def dns(server, name, count):
    """Time from sending an A query over UDP to its answer, one at a time."""
    labels = b"".join(bytes([len(l)]) + l.encode() for l in name.split(".")) + b"\0"
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.settimeout(5)
    s.connect((server, 53))
    samples = []
    for i in range(count):
        qid = i & 0xffff
        query = qid.to_bytes(2, "big") + b"\x01\x00\x00\x01\x00\x00\x00\x00\x00\x00" + labels + b"\x00\x01\x00\x01"
        t0 = time.perf_counter()
        s.send(query)
        while True:
            reply = s.recv(4096)
            if reply[:2] == query[:2]:
                break
        samples.append(time.perf_counter() - t0)
    samples.sort()
    print("p50_us %.1f p90_us %.1f p99_us %.1f" % (samples[len(samples) // 2] * 1e6, samples[int(len(samples) * 0.9)] * 1e6, samples[int(len(samples) * 0.99)] * 1e6))

def bulk(host, port, mib):
    data = b"\0" * (1 << 20)
    c = socket.create_connection((host, port), timeout=10)
    t0 = time.perf_counter()
    c.sendall(b"B")
    for _ in range(mib):
        c.sendall(data)
    c.shutdown(socket.SHUT_WR)
    got = b""
    while True:
        k = c.recv(64)
        if not k:
            break
        got += k
    elapsed = time.perf_counter() - t0
    if int(got) != mib * (1 << 20) + 0:
        sys.exit("server counted %s bytes" % got)
    print("mib_per_s %.1f" % (mib / elapsed))

def rr(host, port, count):
    """Request/response latency on one established connection (64 bytes each way)."""
    c = socket.create_connection((host, port), timeout=10)
    c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    c.sendall(b"R")
    msg = b"x" * 64
    samples = []
    for _ in range(count):
        t0 = time.perf_counter()
        c.sendall(msg)
        got = 0
        while got < 64:
            k = c.recv(64 - got)
            if not k:
                sys.exit("closed")
            got += len(k)
        samples.append(time.perf_counter() - t0)
    c.close()
    samples.sort()
    pick = lambda q: samples[min(len(samples) - 1, int(len(samples) * q))] * 1e6
    print("p50_us %.1f p99_us %.1f" % (pick(0.5), pick(0.99)))

def http_rr(host, port, count, path):
    """HTTP/1.1 GETs on one keep-alive connection (1 kB responses): latency."""
    c = socket.create_connection((host, port), timeout=10)
    c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    request = ("GET %s HTTP/1.1\r\nhost: bench\r\n\r\n" % path).encode()
    samples = []
    buf = b""
    for _ in range(count):
        t0 = time.perf_counter()
        c.sendall(request)
        while b"\r\n\r\n" not in buf:
            buf += c.recv(65536)
        head, buf = buf.split(b"\r\n\r\n", 1)
        if not head.startswith(b"HTTP/1.1 200"):
            sys.exit("status: %r" % head[:40])
        length = int([l for l in head.split(b"\r\n") if l.lower().startswith(b"content-length")][0].split(b":")[1])
        while len(buf) < length:
            buf += c.recv(65536)
        buf = buf[length:]
        samples.append(time.perf_counter() - t0)
    c.close()
    samples.sort()
    pick = lambda q: samples[min(len(samples) - 1, int(len(samples) * q))] * 1e6
    print("p50_us %.1f p99_us %.1f" % (pick(0.5), pick(0.99)))

def handshakes(host, port, secs, cert, key):
    """Full mutual-TLS 1.3 handshakes per second against the tunnel port."""
    import ssl
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    ctx.set_alpn_protocols(["h2"])
    ctx.load_cert_chain(cert, key)
    n = 0
    end = time.perf_counter() + secs
    t0 = time.perf_counter()
    while time.perf_counter() < end:
        s = ctx.wrap_socket(socket.create_connection((host, port), timeout=5))
        s.sendall(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x00\x04\x00\x00\x00\x00\x00")
        if not s.recv(9):
            sys.exit("refused")
        s.close()
        n += 1
    print("per_s %.1f" % (n / (time.perf_counter() - t0)))

def hold_tls(host, port, count, cert, key):
    """Opens `count` idle mutual-TLS connections, prints ready, holds them."""
    import ssl, resource
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    ctx.set_alpn_protocols(["h2"])
    ctx.load_cert_chain(cert, key)
    held = []
    for _ in range(count):
        s = ctx.wrap_socket(socket.create_connection((host, port), timeout=5))
        s.sendall(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x00\x04\x00\x00\x00\x00\x00")
        s.recv(9)
        held.append(s)
    print("ready", flush=True)
    time.sleep(3600)

def hold_tcp(host, port, count):
    """Opens `count` idle TCP connections, prints ready, holds them."""
    import resource
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    held = [socket.create_connection((host, port), timeout=5) for _ in range(count)]
    print("ready %d" % len(held), flush=True)
    time.sleep(3600)

if __name__ == "__main__":
    cmd = sys.argv[1]
    if cmd == "serve":
        serve(int(sys.argv[2]))
    elif cmd == "dns":
        dns(sys.argv[2], sys.argv[3], int(sys.argv[4]))
    elif cmd == "setup":
        setup(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]))
    elif cmd == "bulk":
        bulk(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]))
    elif cmd == "rr":
        rr(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]))
    elif cmd == "http_rr":
        http_rr(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), sys.argv[5])
    elif cmd == "handshakes":
        handshakes(sys.argv[2], int(sys.argv[3]), float(sys.argv[4]), sys.argv[5], sys.argv[6])
    elif cmd == "hold_tcp":
        hold_tcp(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]))
    elif cmd == "hold_tls":
        hold_tls(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), sys.argv[5], sys.argv[6])
