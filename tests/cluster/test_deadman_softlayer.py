"""The dead-man switch on IBM Cloud classic: it cancels the GPU servers through a stand-in SoftLayer REST API."""

from __future__ import annotations

import base64
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from cluster.remote import deadman as remote

USER, KEY = "trainrig-cancel-nmt", "0123abcd"
AUTH = "Basic " + base64.b64encode(f"{USER}:{KEY}".encode()).decode()


class SoftLayerStandIn:
    """SoftLayer_Virtual_Guest deleteObject and getObject over REST, as the API answers them.

    A cancelled guest keeps being listed for `linger` more looks, without its billing item once
    `billing_after_cancel` looks have passed, then is not found."""

    def __init__(self, guests: dict[int, str], fail: int | None = None, billing_after_cancel: int = 1):
        self.guests = dict(guests)  # id -> hostname
        self.cancelled: dict[int, int] = {}  # id -> looks since
        self.requests: list[tuple[str, str]] = []  # (path, Authorization header)
        self.fail = fail
        self.billing_after_cancel = billing_after_cancel
        stand_in = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):
                stand_in.requests.append((self.path, self.headers.get("Authorization", "")))
                status, body = stand_in.answer(self.path, self.headers.get("Authorization"))
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/rest/v3.1/"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def answer(self, path: str, auth: str | None) -> tuple[int, object]:
        if self.fail:
            return self.fail, {"error": "Internal Error" if self.fail >= 500 else "Nope", "code": "SoftLayer_Exception"}
        if auth != AUTH:
            return 401, {"error": "Invalid API token.", "code": "SoftLayer_Exception_Public"}
        service, ident, method = path.split("?")[0].removeprefix("/rest/v3.1/").split("/")
        assert service == "SoftLayer_Virtual_Guest"
        guest_id = int(ident)
        missing = {
            "error": f"Unable to find object with id of '{guest_id}'.",
            "code": "SoftLayer_Exception_ObjectNotFound",
        }
        if guest_id not in self.guests:
            return 404, missing
        if method == "deleteObject.json":
            self.cancelled.setdefault(guest_id, 0)
            return 200, True
        assert method == "getObject.json" and "objectMask=mask%5Bid%2CbillingItem%5Bid%5D%5D" in path
        if guest_id in self.cancelled:
            self.cancelled[guest_id] += 1
            if self.cancelled[guest_id] > self.billing_after_cancel:
                del self.guests[guest_id]
                return 200, {"id": guest_id}  # reclaimed: no billing item any more
        return 200, {"id": guest_id, "billingItem": {"id": 9000 + guest_id}}

    def stop(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def api():
    started: list[SoftLayerStandIn] = []

    def make(**kw) -> SoftLayerStandIn:
        stand_in = SoftLayerStandIn({101: "node0", 102: "node1"}, **kw)
        started.append(stand_in)
        return stand_in

    yield make
    for stand_in in started:
        stand_in.stop()


def configure(tmp_path, url, credentials=None, timeout=5):
    secret = tmp_path / "etc" / "ibm-cancel.json"
    secret.parent.mkdir()
    if credentials is not None:
        secret.write_text(json.dumps(credentials))
    shared = tmp_path / "share"
    (shared / "trainrig").mkdir(parents=True)
    cfg = {
        "shared": str(shared),
        "hosts": ["node0", "node1"],
        "credential": str(secret),
        "softlayer": {
            "api": url,
            "servers": {"node0": 101, "node1": 102},
            "timeout": timeout,
            "poll": 0.05,
        },
    }
    return cfg, shared / "trainrig" / "teardown.json"


def test_the_switch_cancels_each_gpu_server_and_waits_until_none_bills(tmp_path, api, monkeypatch):
    stand_in = api(billing_after_cancel=2)
    monkeypatch.setattr(remote.subprocess, "run", lambda *a, **k: pytest.fail("no SSH power-off on IBM"))
    cfg, record_path = configure(tmp_path, stand_in.url, {"username": USER, "api_key": KEY})
    assert remote.teardown(cfg, str(record_path), "idle", "no run going") == 0
    paths = [p for p, _ in stand_in.requests]
    assert paths[:2] == [
        "/rest/v3.1/SoftLayer_Virtual_Guest/101/deleteObject.json",
        "/rest/v3.1/SoftLayer_Virtual_Guest/102/deleteObject.json",
    ]
    assert all(auth == AUTH for _, auth in stand_in.requests)
    # The wait: looked at each server until the API stopped listing its billing item (twice billing, then not).
    looks = [p for p in paths if "getObject" in p]
    assert len([p for p in looks if "/101/" in p]) == 3 and len([p for p in looks if "/102/" in p]) == 3
    assert not stand_in.guests
    record = json.loads(record_path.read_text())
    assert record["cancelled"] == {"node0": 101, "node1": 102}
    assert record["still_up"] == [] and record["errors"] == {}
    assert record["compute_gone_at"] >= record["cancelled_at"] >= record["at"]
    assert record["trigger"] == "idle" and record["how"] == "cancelled through the SoftLayer API"


def test_a_server_already_gone_counts_as_cancelled(tmp_path, api):
    stand_in = api()
    del stand_in.guests[102]
    cfg, record_path = configure(tmp_path, stand_in.url, {"username": USER, "api_key": KEY})
    assert remote.teardown(cfg, str(record_path), "hard-limit", "up too long") == 0
    record = json.loads(record_path.read_text())
    assert record["cancelled"] == {"node0": 101} and record["still_up"] == []


def test_a_refused_key_is_recorded_and_the_switch_exits_non_zero(tmp_path, api):
    stand_in = api()
    cfg, record_path = configure(tmp_path, stand_in.url, {"username": USER, "api_key": "wrong"})
    started = time.monotonic()
    assert remote.teardown(cfg, str(record_path), "stall", "no step") == 1
    assert time.monotonic() - started < 3  # a refusal is not asked again until the deadline
    record = json.loads(record_path.read_text())
    assert record["still_up"] == ["node0", "node1"] and record["compute_gone_at"] is None
    assert record["errors"]["node0"] == "cancelling server 101: Invalid API token. (SoftLayer_Exception_Public)"
    assert stand_in.guests == {101: "node0", 102: "node1"}


def test_an_api_that_keeps_failing_is_asked_until_the_deadline_then_recorded(tmp_path, api):
    stand_in = api(fail=500)
    cfg, record_path = configure(tmp_path, stand_in.url, {"username": USER, "api_key": KEY}, timeout=0.5)
    assert remote.teardown(cfg, str(record_path), "idle", "quiet") == 1
    record = json.loads(record_path.read_text())
    assert record["still_up"] == ["node0", "node1"]
    assert record["errors"]["node1"] == "cancelling server 102: Internal Error (SoftLayer_Exception)"
    assert len(stand_in.requests) > 2  # asked again while the deadline allowed


def test_no_credential_on_the_node_is_recorded(tmp_path, api):
    stand_in = api()
    cfg, record_path = configure(tmp_path, stand_in.url, credentials=None)
    assert remote.teardown(cfg, str(record_path), "idle", "quiet") == 1
    record = json.loads(record_path.read_text())
    assert "no cancel credential in" in record["errors"]["node0"] and not stand_in.requests


def test_fab_status_says_what_the_api_refused(tmp_path, api):
    from cluster.deadman import describe_record

    stand_in = api()
    cfg, record_path = configure(tmp_path, stand_in.url, {"username": USER, "api_key": "wrong"})
    remote.teardown(cfg, str(record_path), "idle", "no run going")
    text = describe_record(json.loads(record_path.read_text()))
    assert text.endswith(
        "(idle): no run going; still billing: node0, node1 (run fab down); "
        "node0: cancelling server 101: Invalid API token. (SoftLayer_Exception_Public); "
        "node1: cancelling server 102: Invalid API token. (SoftLayer_Exception_Public)"
    )
