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
        if mode == b"C":          # set-up probe: one byte back, then close
            c.sendall(b"C")
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
    print("p50_us %.1f p90_us %.1f" % (samples[len(samples) // 2] * 1e6, samples[int(len(samples) * 0.9)] * 1e6))

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

if __name__ == "__main__":
    cmd = sys.argv[1]
    if cmd == "serve":
        serve(int(sys.argv[2]))
    elif cmd == "setup":
        setup(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]))
    elif cmd == "bulk":
        bulk(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]))
