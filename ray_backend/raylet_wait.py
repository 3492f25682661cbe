"""Starting the private cluster without Ray's one-second nap.

ray.init starts the raylet, waits 0.1 s and then asks the GCS for the new node (ray._private.services.get_node).
The raylet registers only once its agents are up (0.6-0.8 s after it starts here), and until then the GCS client's
lookup sleeps a whole second between tries (GlobalStateAccessor::GetNode; the interval is hard-coded, no system
config reaches it), so every start of the private cluster idled about 0.3 s. While our private cluster starts, the
lookup first polls the GCS's node table every 10 ms until the node is there, then asks as before: Ray's own lookup
still decides, with its own retries and timeout.
"""
from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator

POLL_S = 0.01
# After this the poll gives up and Ray's own lookup waits (and fails) as it always did.
PATIENCE_S = 5.0


def wait_registered(gcs_address: str, node_id: str, patience_s: float = PATIENCE_S) -> bool:
    """Whether the node `node_id` (hex) is registered alive with the GCS at `gcs_address` within `patience_s`."""
    from ray._private import services, state

    global_state = state.GlobalState()
    global_state._initialize_global_state(services._get_gcs_client_options(gcs_address))
    deadline = time.monotonic() + patience_s
    try:
        while True:
            if any(node.get("NodeID") == node_id and node.get("Alive") for node in global_state.node_table()):
                return True
            if time.monotonic() >= deadline:
                return False
            time.sleep(POLL_S)
    finally:
        global_state.disconnect()


@contextlib.contextmanager
def prompt_node_lookup() -> Iterator[None]:
    """While the block runs (our private cluster's ray.init), Ray's node lookup waits for the node by polling first.
    A Ray without these internals keeps its own lookup."""
    from ray._private import services

    original = getattr(services, "get_node", None)
    if original is None or not hasattr(services, "_get_gcs_client_options"):
        yield
        return

    def get_node(gcs_address, node_id):
        try:
            wait_registered(gcs_address, node_id)
        except Exception:  # the poll is only a shortcut: whatever goes wrong in it, Ray's own lookup decides
            pass
        return original(gcs_address, node_id)

    services.get_node = get_node
    try:
        yield
    finally:
        services.get_node = original
