"""A small client for a ComfyUI server's HTTP API and websocket: queue a prompt, follow it, fetch its outputs.

Flow: open ``/ws?clientId=ID`` first (so no event is missed), POST ``/prompt`` with the same client_id, read events
until execution_success / execution_error / execution_interrupted for our prompt, then poll ``GET /history/ID``
(it can be ``{}`` for a moment after success) and download output files with ``GET /view``. Failures raise
ComfyAPIError subclasses whose message names the node id, node type and exception, ready to print as is.
"""

from __future__ import annotations

import json
import struct
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import websocket

EventHandler = Callable[[str, dict[str, Any]], None]
FINAL_EVENTS = ("execution_success", "execution_error", "execution_interrupted")
PREVIEW_IMAGE = 1  # ComfyUI's binary frame type for a live preview: (type, image format) as 4-byte ints, then the image
HISTORY_POLL_S = 0.2
WS_POLL_S = 5.0  # how often a silent websocket is cross-checked against /history


class ComfyAPIError(RuntimeError):
    """A request to the server failed, or the server reported a failure; str() is a plain explanation."""


class PromptRejected(ComfyAPIError):
    """POST /prompt answered 400: the workflow did not validate (unknown node type, bad value, missing file...)."""

    def __init__(self, error: dict[str, Any], node_errors: dict[str, Any]):
        self.error = error
        self.node_errors = node_errors
        lines = [f"ComfyUI rejected the workflow: {_join(error.get('message'), error.get('details'))}"]
        for node_id, entry in node_errors.items():
            for problem in entry.get("errors", []):
                lines.append(f"  node {node_id} ({entry.get('class_type', '?')}): "
                             f"{_join(problem.get('message'), problem.get('details'))}")
        super().__init__("\n".join(lines))


class ExecutionFailed(ComfyAPIError):
    """A node raised while the prompt ran (the execution_error event)."""

    def __init__(self, event: dict[str, Any]):
        self.event = event
        self.node_id = str(event.get("node_id"))
        self.node_type = event.get("node_type", "?")
        self.exception_type = event.get("exception_type", "")
        self.exception_message = str(event.get("exception_message", "")).strip()
        super().__init__(f"node {self.node_id} ({self.node_type}) failed: "
                         f"{_join(self.exception_type, self.exception_message)}")


class ExecutionInterrupted(ComfyAPIError):
    """The prompt was interrupted (POST /interrupt, or the Cancel button) before it finished."""

    def __init__(self, event: dict[str, Any]):
        self.event = event
        super().__init__(f"execution was interrupted at node {event.get('node_id')} ({event.get('node_type', '?')})")


@dataclass(frozen=True)
class OutputFile:
    """One file a node reported in its UI output (SaveImage's images, SaveLatent's latents, ...)."""

    node_id: str
    kind: str  # the UI output key: "images", "latents", ...
    filename: str
    subfolder: str
    type: str  # "output", "temp" or "input": which server folder holds it


@dataclass
class PromptResult:
    prompt_id: str
    outputs: dict[str, dict[str, Any]]  # node id -> that node's UI output, as in /history
    events: list[tuple[str, dict[str, Any]]] = field(default_factory=list)  # this prompt's websocket events, in order
    previews: list[bytes] = field(default_factory=list)  # live preview images (JPEG/PNG bytes) sent while it ran

    @property
    def files(self) -> list[OutputFile]:
        found = []
        for node_id, ui in self.outputs.items():
            for kind, items in ui.items():
                if not isinstance(items, list):
                    continue
                found += [OutputFile(node_id, kind, item["filename"], item.get("subfolder", ""), item["type"])
                          for item in items if isinstance(item, dict) and {"filename", "type"} <= item.keys()]
        return found


class ComfyClient:
    """Talks to one ComfyUI server, e.g. ``ComfyClient("http://127.0.0.1:8188")``."""

    def __init__(self, url: str, client_id: str | None = None, request_timeout: float = 60.0):
        self.url = url.rstrip("/")
        self.client_id = client_id or uuid.uuid4().hex
        self.request_timeout = request_timeout

    def object_info(self) -> dict[str, Any]:
        """Every node type the server knows, with its inputs and outputs (GET /object_info)."""
        return self._get_json("/object_info")

    def queue_prompt(self, prompt: dict[str, Any], extra_data: dict[str, Any] | None = None) -> str:
        """POST an API-format workflow; returns its prompt id. Raises PromptRejected if it does not validate.

        ``extra_data`` goes with it as the frontend sends it, e.g. ``{"preview_method": "latent2rgb"}``."""
        body = json.dumps({"prompt": prompt, "client_id": self.client_id, **({"extra_data": extra_data} if extra_data else {})}).encode()
        request = urllib.request.Request(f"{self.url}/prompt", data=body, method="POST",
                                         headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=self.request_timeout) as response:
                return json.load(response)["prompt_id"]
        except urllib.error.HTTPError as error:
            payload = _json_or_none(error.read())
            if error.code == 400 and isinstance(payload, dict) and "error" in payload:
                raise PromptRejected(_as_error(payload["error"]), payload.get("node_errors") or {}) from None
            raise ComfyAPIError(f"POST {self.url}/prompt answered HTTP {error.code}: {payload}") from None
        except urllib.error.URLError as error:
            raise ComfyAPIError(f"cannot reach ComfyUI at {self.url}: {error.reason}") from None

    def history(self, prompt_id: str) -> dict[str, Any] | None:
        """The /history entry of a prompt, or None while the server has none yet."""
        return self._get_json(f"/history/{urllib.parse.quote(prompt_id)}").get(prompt_id)

    def run(self, prompt: dict[str, Any], on_event: EventHandler | None = None,
            timeout: float | None = None, extra_data: dict[str, Any] | None = None) -> PromptResult:
        """Queue ``prompt`` (with ``extra_data``), follow it to the end and return its outputs and the live previews
        it sent; ``on_event(type, data)`` sees each event.

        Raises PromptRejected, ExecutionFailed, ExecutionInterrupted, or ComfyAPIError (connection lost, timeout).
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        ws = self._connect_ws()
        previews: list[bytes] = []
        try:
            prompt_id = self.queue_prompt(prompt, extra_data)
            events = self._follow(ws, prompt_id, on_event, deadline, previews)
        finally:
            ws.close()
        final_type, final_data = events[-1]
        if final_type == "execution_error":
            raise ExecutionFailed(final_data)
        if final_type == "execution_interrupted":
            raise ExecutionInterrupted(final_data)
        entry = self._wait_history(prompt_id, deadline)
        return PromptResult(prompt_id, entry.get("outputs", {}), events, previews)

    def download(self, file: OutputFile, dest_dir: str | Path) -> Path:
        """Fetch one output file (GET /view) into ``dest_dir``, keeping its subfolder; returns the local path."""
        query = urllib.parse.urlencode({"filename": file.filename, "subfolder": file.subfolder, "type": file.type})
        dest = Path(dest_dir) / file.subfolder / Path(file.filename).name
        dest.parent.mkdir(parents=True, exist_ok=True)
        try:
            with urllib.request.urlopen(f"{self.url}/view?{query}", timeout=self.request_timeout) as response:
                dest.write_bytes(response.read())
        except urllib.error.HTTPError as error:
            raise ComfyAPIError(f"GET /view for {file.filename} answered HTTP {error.code}") from None
        return dest

    def _follow(self, ws: websocket.WebSocket, prompt_id: str, on_event: EventHandler | None,
                deadline: float | None, previews: list[bytes]) -> list[tuple[str, dict[str, Any]]]:
        events: list[tuple[str, dict[str, Any]]] = []
        while True:
            ws.settimeout(_remaining(deadline, WS_POLL_S))
            try:
                raw = ws.recv()
            except websocket.WebSocketTimeoutException:
                # A quiet stretch (a long model load) or a missed final event: /history settles which.
                if (final := self._final_event_from_history(prompt_id)) is not None:
                    return [*events, final]
                _check_deadline(deadline, f"prompt {prompt_id}")
                continue
            except (websocket.WebSocketConnectionClosedException, ConnectionError) as error:
                raise ComfyAPIError(f"lost the websocket to {self.url} while prompt {prompt_id} ran: {error}") from None
            if not isinstance(raw, str):
                # Binary frames are live previews; ComfyUI sends them to the client whose prompt runs.
                if len(raw) > 8 and struct.unpack(">I", raw[:4])[0] == PREVIEW_IMAGE:
                    previews.append(bytes(raw[8:]))
                continue
            message = json.loads(raw)
            event_type, data = message.get("type", ""), message.get("data") or {}
            if data.get("prompt_id", prompt_id) != prompt_id:
                continue  # another prompt's events (broadcast, or queued by the same client id)
            events.append((event_type, data))
            if on_event is not None:
                on_event(event_type, data)
            if event_type in FINAL_EVENTS:
                return events

    def _final_event_from_history(self, prompt_id: str) -> tuple[str, dict[str, Any]] | None:
        # The server writes a history entry only once the prompt has finished, with the final event among its
        # status messages.
        entry = self.history(prompt_id)
        if entry is None:
            return None
        for event_type, data in (entry.get("status") or {}).get("messages", []):
            if event_type in FINAL_EVENTS:
                return event_type, data
        return "execution_success", {"prompt_id": prompt_id}

    def _wait_history(self, prompt_id: str, deadline: float | None) -> dict[str, Any]:
        # The server records history just after it sends execution_success: poll briefly for it.
        history_deadline = time.monotonic() + 30.0 if deadline is None else deadline
        while (entry := self.history(prompt_id)) is None:
            _check_deadline(history_deadline, f"the history entry of prompt {prompt_id}")
            time.sleep(HISTORY_POLL_S)
        return entry

    def _connect_ws(self) -> websocket.WebSocket:
        parts = urllib.parse.urlsplit(self.url)
        scheme = "wss" if parts.scheme == "https" else "ws"
        ws_url = urllib.parse.urlunsplit((scheme, parts.netloc, f"{parts.path}/ws", f"clientId={self.client_id}", ""))
        try:
            return websocket.create_connection(ws_url, timeout=self.request_timeout)
        except (OSError, websocket.WebSocketException) as error:
            raise ComfyAPIError(f"cannot reach ComfyUI at {self.url} (is the server running?): "
                                f"websocket {ws_url}: {error}") from None

    def _get_json(self, route: str) -> Any:
        try:
            with urllib.request.urlopen(f"{self.url}{route}", timeout=self.request_timeout) as response:
                return json.load(response)
        except urllib.error.HTTPError as error:
            raise ComfyAPIError(f"GET {self.url}{route} answered HTTP {error.code}") from None
        except urllib.error.URLError as error:
            raise ComfyAPIError(f"cannot reach ComfyUI at {self.url}: {error.reason}") from None


def _remaining(deadline: float | None, cap: float) -> float:
    return cap if deadline is None else max(0.05, min(cap, deadline - time.monotonic()))


def _check_deadline(deadline: float | None, what: str) -> None:
    if deadline is not None and time.monotonic() >= deadline:
        raise ComfyAPIError(f"timed out waiting for {what}")


def _json_or_none(raw: bytes) -> Any:
    try:
        return json.loads(raw)
    except ValueError:
        return raw.decode(errors="replace")


def _as_error(error: Any) -> dict[str, Any]:
    return error if isinstance(error, dict) else {"message": str(error)}


def _join(*parts: Any) -> str:
    return ": ".join(str(part).strip() for part in parts if part and str(part).strip())
