import base64, hashlib, os, signal, struct, sys, time
from http.server import ThreadingHTTPServer, BaseHTTPRequestHandler

MARK = open("version.txt").read().strip() + "/" + os.environ.get("GREETING", "hello")


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    # Headers and body go out in separate writes; with Nagle on, the body waited for the
    # client's delayed ACK (40 ms) on every keep-alive request.
    disable_nagle_algorithm = True

    def do_GET(self):
        if self.path == "/ws":
            self.websocket()
            return
        if self.path.startswith("/stream"):
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            for i in range(30):
                data = ("data: %s %d\n\n" % (MARK, i)).encode()
                self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
                self.wfile.flush()
                time.sleep(0.1)
            self.wfile.write(b"0\r\n\r\n")
            return
        if self.path == "/limit":
            status, body = 200, memory_limit()
        elif self.path == "/hog":
            hog = b"x" * (1 << 30)
            status, body = 200, b"%d bytes\n" % len(hog)
        elif os.environ.get("FAIL"):
            status, body = 500, b"broken\n"
        elif self.path == "/peer":
            # Who connected, and to which of the container's addresses.
            status, body = 200, ("%s %s\n" % (self.client_address[0], self.connection.getsockname()[0])).encode()
        elif self.path == "/health":
            status, body = 200, b"healthy\n"
        else:
            status, body = 200, (MARK + "\n").encode()
        self.send_response(status)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def websocket(self):
        """Echoes each text message prefixed with MARK, until the client closes."""
        key = self.headers["Sec-WebSocket-Key"] + "258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
        self.send_response(101)
        self.send_header("Upgrade", "websocket")
        self.send_header("Connection", "Upgrade")
        self.send_header("Sec-WebSocket-Accept", base64.b64encode(hashlib.sha1(key.encode()).digest()).decode())
        self.end_headers()
        self.wfile.flush()
        self.close_connection = True
        while True:
            head = self.rfile.read(2)
            if len(head) < 2:
                return
            opcode, length = head[0] & 0x0F, head[1] & 0x7F
            if length == 126:
                length = struct.unpack(">H", self.rfile.read(2))[0]
            mask = self.rfile.read(4) if head[1] & 0x80 else b"\0\0\0\0"
            data = bytes(b ^ mask[i % 4] for i, b in enumerate(self.rfile.read(length)))
            if opcode == 8:
                self.wfile.write(b"\x88\x00")
                self.wfile.flush()
                return
            reply = ("%s %s" % (MARK, data.decode()))[:125].encode()
            self.wfile.write(bytes([0x81, len(reply)]) + reply)
            self.wfile.flush()

    def log_message(self, *args):
        pass


def memory_limit():
    """The container's memory limit as its own cgroup shows it (cgroup v1 or v2)."""
    for path in ("/sys/fs/cgroup/memory/memory.limit_in_bytes", "/sys/fs/cgroup/memory.max"):
        try:
            with open(path) as f:
                return f.read().strip().encode() + b"\n"
        except OSError:
            pass
    return b"unknown\n"


ThreadingHTTPServer.daemon_threads = True
# socketserver's listen backlog is 5: the proxy's first connections to a new container overflowed
# it, and each dropped SYN was retried a second later.
ThreadingHTTPServer.request_queue_size = 128
server = ThreadingHTTPServer(("0.0.0.0", int(os.environ["PORT"])), Handler)
signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
print("listening", flush=True)
server.serve_forever()
