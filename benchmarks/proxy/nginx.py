"""nginx from Debian as the C reference proxy: a plain reverse proxy to the replica ports.

``write_config`` renders an ``nginx.conf`` for a private prefix directory (pid file, logs and
temp paths all inside it, so no root-owned path is touched and any user can run it):

- one worker process (the proxy under test gets one core), ``daemon off`` (the benchmark owns
  the process and stops it with SIGQUIT/SIGTERM);
- ``random two least_conn``: nginx's own power-of-two-choices, on its active connection counts
  — the closest nginx gets to kvgate's p2c (nginx has no queue-depth signal);
- keepalive connections to the replicas (``proxy_http_version 1.1`` with the ``Connection``
  header cleared), effectively unlimited keepalive requests on both sides;
- ``proxy_buffering off`` so SSE events go out as they arrive, request bodies buffered (the
  default; they are small);
- an access log like kvgate's (one line per request, buffered), so both pay for one.

``nginx_binary()`` finds the executable (``/usr/sbin/nginx`` from the Debian package);
``mk/proxy.mk`` installs it.
"""

from __future__ import annotations

import grp
import os
import pwd
import shutil
from collections.abc import Sequence
from pathlib import Path

NGINX_CANDIDATES = ("/usr/sbin/nginx", "/usr/bin/nginx")


def nginx_binary() -> str | None:
    found = shutil.which("nginx")
    if found:
        return found
    for candidate in NGINX_CANDIDATES:
        if os.access(candidate, os.X_OK):
            return candidate
    return None


def _user_directive() -> str:
    # A master started as root would switch its workers to "nobody", who cannot write to the
    # prefix; keep them as the current user (the directive is ignored when not root).
    if os.geteuid() != 0:
        return ""
    user = pwd.getpwuid(os.geteuid()).pw_name
    group = grp.getgrgid(os.getegid()).gr_name
    return f"user {user} {group};\n"


def write_config(prefix: Path, *, port: int, replica_ports: Sequence[int]) -> Path:
    """Write ``prefix/nginx.conf`` (and the directories it names); return its path."""
    for sub in ("logs", "tmp"):
        (prefix / sub).mkdir(parents=True, exist_ok=True)
    servers = "".join(f"        server 127.0.0.1:{p} max_fails=0;\n" for p in replica_ports)
    tmp = prefix / "tmp"
    conf = f"""{_user_directive()}worker_processes 1;
daemon off;
pid {prefix}/nginx.pid;
error_log {prefix}/logs/error.log warn;
worker_rlimit_nofile 65536;

events {{
    worker_connections 16384;
    multi_accept on;
}}

http {{
    access_log {prefix}/logs/access.log combined buffer=64k flush=1s;
    client_body_temp_path {tmp}/body;
    proxy_temp_path {tmp}/proxy;
    fastcgi_temp_path {tmp}/fastcgi;
    uwsgi_temp_path {tmp}/uwsgi;
    scgi_temp_path {tmp}/scgi;
    keepalive_requests 1000000;
    keepalive_timeout 75s;

    upstream replicas {{
        random two least_conn;
{servers}        keepalive 512;
        keepalive_requests 1000000;
    }}

    server {{
        listen 127.0.0.1:{port} backlog=4096;
        location / {{
            proxy_pass http://replicas;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_buffering off;
            proxy_read_timeout 600s;
        }}
    }}
}}
"""
    path = prefix / "nginx.conf"
    path.write_text(conf)
    return path


def command(binary: str, prefix: Path, conf: Path) -> list[str]:
    """The nginx command line: foreground, the given prefix, errors before the config is read
    go to the prefix too (``-e``)."""
    return [binary, "-p", str(prefix), "-c", str(conf), "-e", str(prefix / "logs" / "error.log")]
