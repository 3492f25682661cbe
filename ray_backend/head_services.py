"""Starting the private cluster's head without the two services it never uses.

Besides the GCS and the raylet, ray.init starts on a head node an API server (the dashboard's process: with the
dashboard off it loads only the usage-stats module, and our private cluster turns usage stats off) and the
autoscaler's monitor (a one-node private cluster has nothing to scale). ray.init then waits until the API server has
published its address: 0.7-0.8 s of a 1.9 s start on the 2-core machine, and the two take ~1.2 CPU-s that the
workers' imports, which start right after, need. While our private cluster starts, neither is started. What needs
them (job submission, the state API, `ray status`) is not used on it; a cluster an operator names keeps all of Ray's
services, since we never start that one.
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterator

# ray._private.node.Node's methods that start them: start_api_server(self, *, include_dashboard, raise_on_failure)
# and start_monitor(self). Both only start a process and record it; nothing else in the node's start reads that.
UNUSED_HEAD_SERVICES = ("start_api_server", "start_monitor")


def _not_started(self, *args, **kwargs) -> None:
    return None


@contextlib.contextmanager
def without_unused_head_services() -> Iterator[None]:
    """While the block runs (our private cluster's ray.init), a head node starts without Ray's API server and
    autoscaler monitor. A Ray whose node lacks one of these methods starts that service as it always did."""
    from ray._private import node

    node_class = node.Node
    originals = {name: node_class.__dict__[name] for name in UNUSED_HEAD_SERVICES if name in node_class.__dict__}
    for name in originals:
        setattr(node_class, name, _not_started)
    try:
        yield
    finally:
        for name, original in originals.items():
            setattr(node_class, name, original)
