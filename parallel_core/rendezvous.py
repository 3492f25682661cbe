"""Where a process group meets: a TCPStore whose server listens on one chosen address only, or a file.

torch's TCPStore server otherwise listens on every interface; a local pool must stay on loopback, and a cluster
pool on the node's own address. Binding the socket ourselves and handing its descriptor over does that, and the
OS picks the port (no free-port race). The store has no authentication, so ranks that share a machine meet at a
file in a folder only their user can enter instead: nothing listens at all.
"""
from __future__ import annotations

import socket
from datetime import timedelta

import torch.distributed as dist


def serve_store(host: str, world_size: int, timeout_s: float = 120.0) -> dist.TCPStore:
    """The master TCPStore, listening on `host` only (port: `.port`)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.bind((host, 0))
    sock.listen()
    port = sock.getsockname()[1]
    # detach(): the store owns the descriptor from here on, so Python never closes it under the store's feet.
    return dist.TCPStore(host, port, world_size, is_master=True, wait_for_workers=False, timeout=timedelta(seconds=timeout_s),
                         master_listen_fd=sock.detach(), use_libuv=False)


def connect_store(host: str, port: int, world_size: int, timeout_s: float = 120.0) -> dist.TCPStore:
    return dist.TCPStore(host, port, world_size, is_master=False, timeout=timedelta(seconds=timeout_s))


def file_store(path: str, world_size: int) -> dist.FileStore:
    """A store in the file `path` (new per group; its folder's permissions decide who can take part)."""
    return dist.FileStore(path, world_size)
