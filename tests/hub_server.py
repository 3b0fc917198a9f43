"""A loopback stand-in for the parts of the Hugging Face Hub API that huggingface_hub's
create_repo and upload_folder call. Stores uploaded files in memory; records the tokens seen."""

import base64
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class HubServer:
    def __init__(self):
        self.files: dict[str, dict[str, bytes]] = {}  # repo -> path -> content
        self.repos: dict[str, dict] = {}
        self.authorization: set[str] = set()
        self.fail_commits = False
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def _reply(self, status, payload=None):
                body = json.dumps(payload).encode() if payload is not None else b""
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(body)

            def _body(self):
                return self.rfile.read(int(self.headers.get("Content-Length") or 0))

            def do_HEAD(self):
                self._reply(404)

            def do_GET(self):
                server.authorization.add(self.headers.get("Authorization", ""))
                if self.path.split("?")[0] == "/api/whoami-v2" and self.headers.get("Authorization"):
                    self._reply(200, {"name": "me", "type": "user", "orgs": []})
                    return
                self._reply(401 if "whoami" in self.path else 404, {"error": "not found"})

            def do_POST(self):
                server.authorization.add(self.headers.get("Authorization", ""))
                body = self._body()
                path = self.path.split("?")[0]
                if path == "/api/repos/create":
                    request = json.loads(body)
                    repo = f"{request.get('organization') or 'user'}/{request['name']}" if "/" not in request["name"] else request["name"]
                    server.repos[repo] = request
                    return self._reply(200, {"url": f"http://{self.headers['Host']}/{repo}", "name": repo})
                if path == "/api/validate-yaml":
                    return self._reply(200, {})
                parts = path.strip("/").split("/")  # api, models, owner, name, verb, revision
                if len(parts) >= 6 and parts[:2] == ["api", "models"]:
                    repo, verb = f"{parts[2]}/{parts[3]}", parts[4]
                    if verb == "preupload":
                        files = json.loads(body)["files"]
                        return self._reply(200, {"files": [
                            {"path": f["path"], "uploadMode": "regular", "shouldIgnore": False} for f in files
                        ]})
                    if verb == "commit":
                        if server.fail_commits:
                            return self._reply(500, {"error": "storage is down"})
                        for line in body.decode().splitlines():
                            item = json.loads(line)
                            if item["key"] == "file":
                                value = item["value"]
                                server.files.setdefault(repo, {})[value["path"]] = base64.b64decode(value["content"])
                        return self._reply(200, {"commitUrl": f"http://{self.headers['Host']}/{repo}/commit/1",
                                                 "commitOid": "0" * 40})
                self._reply(404, {"error": f"unexpected {self.command} {self.path}"})

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()
