import os, signal, sys, time
from http.server import ThreadingHTTPServer, BaseHTTPRequestHandler

MARK = open("version.txt").read().strip() + "/" + os.environ.get("GREETING", "hello")


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_GET(self):
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
        if os.environ.get("FAIL"):
            status, body = 500, b"broken\n"
        elif self.path == "/health":
            status, body = 200, b"healthy\n"
        else:
            status, body = 200, (MARK + "\n").encode()
        self.send_response(status)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


ThreadingHTTPServer.daemon_threads = True
server = ThreadingHTTPServer(("0.0.0.0", int(os.environ["PORT"])), Handler)
signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
print("listening", flush=True)
server.serve_forever()
