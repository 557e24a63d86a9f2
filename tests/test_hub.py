"""Is the Hugging Face hub there? Only a clear "no" counts as unreachable, the offline switches skip the
question, and the answer comes within its timeout however the network fails.

    python -m pytest -q tests/test_hub.py

No test leaves the machine: urllib is monkeypatched, or a server on 127.0.0.1 answers. What a hub
name loads through (download, cache, the message when neither works) is tested in tests/test_hf.py.
"""

import types

import pytest

from homegpt import hub


@pytest.fixture
def probe(monkeypatch):
    """hub_unreachable_reason with no offline switch set and a fresh (uncached) probe."""
    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "http_proxy", "HTTP_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)
    hub._probe.cache_clear()
    yield hub.hub_unreachable_reason
    hub._probe.cache_clear()


@pytest.mark.parametrize("var", ["HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"])
def test_offline_switch_skips_the_probe(probe, monkeypatch, var):
    import urllib.request

    monkeypatch.setattr(urllib.request, "urlopen", lambda *a, **k: pytest.fail("probed although offline"))
    monkeypatch.setenv(var, "1")
    assert probe() == f"{var}=1 is set"
    monkeypatch.setenv(var, "0")  # huggingface_hub's "false": the probe runs
    monkeypatch.setattr(urllib.request, "urlopen", lambda *a, **k: types.SimpleNamespace(close=lambda: None))
    assert probe() is None


def _raise(e):
    def urlopen(*args, **kwargs):
        raise e
    return urlopen


def test_probe_counts_only_a_clear_no_as_unreachable(probe, monkeypatch):
    import socket
    import ssl
    import urllib.error
    import urllib.request

    url = "https://huggingface.co"
    down = {"dns": urllib.error.URLError(socket.gaierror(-2, "Name or service not known")),
            "refused": urllib.error.URLError(ConnectionRefusedError(111, "Connection refused")),
            "timeout": TimeoutError("timed out")}
    up = {"404": urllib.error.HTTPError(url, 404, "Not Found", {}, None),
          "503": urllib.error.HTTPError(url, 503, "Service Unavailable", {}, None),
          "tls": urllib.error.URLError(ssl.SSLCertVerificationError("self-signed certificate"))}
    for name, e in {**down, **up}.items():
        hub._probe.cache_clear()
        monkeypatch.setattr(urllib.request, "urlopen", _raise(e))
        reason = probe()
        assert (reason is not None) == (name in down), (name, reason)
        if reason:
            assert reason.startswith(url + ": ")  # the message says what was asked and what came back


def test_probe_gives_up_after_its_timeout(probe, monkeypatch):
    """No wall clock read here: the lookup ends only when the test lets it, so a probe that waited for it
    would return only after the test had let it end."""
    import threading
    import urllib.request
    released, finished = threading.Event(), threading.Event()

    def hanging(*args, **kwargs):  # a DNS lookup with no resolver to answer it
        released.wait(30)
        finished.set()
        return types.SimpleNamespace(close=lambda: None)
    monkeypatch.setattr(urllib.request, "urlopen", hanging)
    assert probe(timeout=0.2) == "https://huggingface.co: no answer within 0.2 s"
    assert not finished.is_set()  # it gave up on the lookup instead of waiting it out
    released.set()


def test_probe_over_real_sockets_on_localhost(probe, monkeypatch):
    # the urllib path end to end, without leaving the machine: a server answering 404 is "reachable",
    # the same port closed (connection refused) is not
    import http.server
    import threading
    constants = pytest.importorskip("huggingface_hub.constants")

    class NotFound(http.server.BaseHTTPRequestHandler):
        def do_HEAD(self):
            self.send_response(404)
            self.end_headers()

        def log_message(self, *args):
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), NotFound)
    url = f"http://127.0.0.1:{server.server_address[1]}"
    monkeypatch.setattr(constants, "ENDPOINT", url)
    threading.Thread(target=server.handle_request, daemon=True).start()
    try:
        assert probe() is None
    finally:
        server.server_close()
    hub._probe.cache_clear()
    reason = probe()
    assert reason is not None and reason.startswith(url) and "refused" in reason.lower()
