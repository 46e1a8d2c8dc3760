# A real TLS client for the tunnel-port rejection tests. Prints one line:
# OPEN <n> (the peer answered HTTP/2 after the handshake), or REFUSED <why>.
import socket, ssl, sys

mode, host, port = sys.argv[1], sys.argv[2], int(sys.argv[3])
cert = sys.argv[4] if len(sys.argv) > 4 and sys.argv[4] != "-" else None
key = sys.argv[5] if len(sys.argv) > 5 and sys.argv[5] != "-" else None
raw = socket.create_connection((host, port), timeout=5)
raw.settimeout(5)
try:
    if mode == "plain":
        raw.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        data = raw.recv(100)
        print("OPEN" if data.startswith(b"HTTP/") else "REFUSED plaintext answered with %r" % data[:20])
        sys.exit(0)
    if mode == "garbage":
        import os
        raw.sendall(os.urandom(64 * 1024))
        data = raw.recv(100)
        print("REFUSED closed" if not data or data[0] == 0x15 else "OPEN answered %r" % data[:20])
        sys.exit(0)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE  # this client tests the server's checks, not the other way
    ctx.set_alpn_protocols(["h2"])
    if mode == "tls12":
        ctx.maximum_version = ssl.TLSVersion.TLSv1_2
    if cert:
        ctx.load_cert_chain(cert, key)
    s = ctx.wrap_socket(raw)
    # TLS 1.3: the server checks the client certificate after the client thinks
    # the handshake is done; the verdict arrives with the first read.
    s.sendall(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + b"\x00\x00\x00\x04\x00\x00\x00\x00\x00")
    data = s.recv(100)
    print("OPEN %d" % len(data) if data else "REFUSED closed")
except (ssl.SSLError, OSError) as e:
    print("REFUSED %s: %s" % (type(e).__name__, e))
