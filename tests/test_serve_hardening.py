"""The public service cannot be blocked or drained by anyone (issue #31, items 7 and 8; items 9
and 10 are in ``test_helm_chart.py`` and ``test_app_page.py`` / ``test_page_static.py``).

The command's two servers run with the fake model of ``tests/serve_fakes.py`` in a
subprocess on 127.0.0.1, as in ``test_serve_limits.py``. Each test says how it fails on the
code before the fix.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
from test_serve import call, metric, post_image
from test_serve_limits import JPEG, fake_server

from fruitdask.cli import main

MIB = 2**20


def post_from(port: int, forwarded_for: str | None = None) -> tuple[int, dict, dict, float]:
    """POST the sample JPEG, optionally with ``X-Forwarded-For``: status, body, headers, seconds."""
    headers = {"Content-Type": "image/jpeg", **({"X-Forwarded-For": forwarded_for} if forwarded_for else {})}
    start = time.monotonic()
    status, got_headers, body = call(port, "POST", "/v1/predict", JPEG, headers, timeout=60)
    return status, json.loads(body), got_headers, time.monotonic() - start


# --- item 7: bytes as they arrive, a bounded decode wait, uploads per client ----------------


@pytest.mark.integration
def test_idle_uploads_reserve_nothing_and_photos_are_still_answered(tmp_path):
    """Eight sockets declare 8 MiB each (the whole 64 MiB budget) and send no body: they hold
    nothing, and real photos are answered at once. Only bytes that arrived are held.

    Before the fix the declared 64 MiB were reserved at once: each photo waited the whole
    ``--body-timeout`` (then 503 ``busy``, or 200 once the idle sockets got their 408), and
    ``fruitdask_serve_inflight_bytes`` did not exist."""
    # Eight addresses in the field; all are 127.0.0.1 here: the per-client limit is raised so
    # that the byte budget alone is tested.
    flags = ("--body-timeout", "6", "--max-inflight-bytes", str(64 * MIB), "--max-uploads-per-client", "16")
    with fake_server(tmp_path, *flags) as srv:
        head = (b"POST /v1/predict HTTP/1.1\r\nHost: x\r\nContent-Type: image/jpeg\r\n"
                + f"Content-Length: {8 * MIB}\r\n\r\n".encode())
        idle = [socket.create_connection(("127.0.0.1", srv["port"]), timeout=30) for _ in range(8)]
        try:
            for s in idle:
                s.sendall(head)
            time.sleep(0.5)
            for _ in range(3):
                status, body, _, seconds = post_from(srv["port"])
                assert status == 200 and seconds < 2.0, (status, body, seconds)
            text = call(srv["probe"], "GET", "/metrics")[2].decode()
            assert metric(text, "fruitdask_serve_inflight_bytes") == 0
            # One of them sends 1 MiB of its body: exactly that much is held now.
            idle[0].sendall(b"\xff" * MIB)
            deadline = time.monotonic() + 10
            while metric(call(srv["probe"], "GET", "/metrics")[2].decode(), "fruitdask_serve_inflight_bytes") != MIB:
                assert time.monotonic() < deadline, "the 1 MiB that arrived is not counted"
                time.sleep(0.1)
        finally:
            for s in idle:
                s.close()


@pytest.mark.integration
def test_a_decode_wait_ends_with_503_decode_busy(tmp_path):
    """One decode thread, held 3 s by a slow decode: the second photo waits ``--decode-timeout``
    (1 s), then gets 503 ``decode_busy`` with Retry-After; the first gets its answer.

    Before the fix the wait had no bound and ``--decode-timeout`` did not exist (the server
    refused to start on it)."""
    with fake_server(tmp_path, "--decode-threads", "1", "--decode-timeout", "1", decode_delay=3.0) as srv:
        with ThreadPoolExecutor(2) as pool:
            first = pool.submit(post_from, srv["port"])
            time.sleep(0.3)  # the first holds the only decode thread now
            second = pool.submit(post_from, srv["port"])
            status, body, headers, seconds = second.result(30)
            assert (status, body["error"]) == (503, "decode_busy"), body
            assert headers["retry-after"] == "1" and "--decode-timeout" in body["reason"]
            assert 0.8 < seconds < 2.5, seconds
            assert first.result(30)[0] == 200
        text = call(srv["probe"], "GET", "/metrics")[2].decode()
        assert metric(text, "fruitdask_serve_rejected_images_total", error="decode_busy") == 1


@pytest.mark.integration
def test_uploads_per_client_are_limited_by_the_peer_address(tmp_path):
    """``--max-uploads-per-client 2``: a third upload in flight from 127.0.0.1 gets 429
    ``too_many_uploads`` whatever ``X-Forwarded-For`` it claims (no proxy is trusted); the
    slots come back with the answers.

    Before the fix there was no such limit (and no such flag: the server refused to start)."""
    with fake_server(tmp_path, "--max-uploads-per-client", "2", model_delay=2.0) as srv:
        with ThreadPoolExecutor(3) as pool:
            answers = list(pool.map(lambda hop: post_from(srv["port"], hop), ["203.0.113.1", "203.0.113.2", "203.0.113.3"]))
        statuses = sorted(a[0] for a in answers)
        assert statuses == [200, 200, 429], answers
        (refused,) = [a for a in answers if a[0] == 429]
        assert refused[1]["error"] == "too_many_uploads" and refused[2]["retry-after"] == "1"
        assert refused[3] < 1.5  # refused at once, not after the others' answers
        assert post_from(srv["port"])[0] == 200  # both slots were given back
        body = call(srv["port"], "GET", "/v1/model")[2]
        assert json.loads(body)["limits"]["max_uploads_per_client"] == 2


@pytest.mark.integration
def test_uploads_per_client_behind_a_trusted_ingress(tmp_path):
    """``--trusted-proxies`` names the ingress (127.0.0.0/8 here) and its inner hops (10.0.0.0/8):
    the client is the first hop of ``X-Forwarded-For``, from the right, outside them. Two users
    behind the one ingress address are two clients; one user who writes other addresses on the
    left of the header is still one client.

    Before the fix there was no such flag (the server refused to start on it)."""
    flags = ("--max-uploads-per-client", "1", "--trusted-proxies", "127.0.0.0/8,10.0.0.0/8")
    with fake_server(tmp_path, *flags, model_delay=2.0) as srv:
        hops = {"user A": "203.0.113.1", "user B": "203.0.113.2, 10.0.0.5",
                "user C": "1.1.1.1, 198.51.100.7, 10.0.0.5", "user C again": "2.2.2.2, 198.51.100.7"}
        with ThreadPoolExecutor(4) as pool:
            answers = dict(zip(hops, pool.map(lambda h: post_from(srv["port"], h), hops.values()), strict=True))
        assert answers["user A"][0] == 200 and answers["user B"][0] == 200, answers
        assert sorted((answers["user C"][0], answers["user C again"][0])) == [200, 429], answers


def test_the_client_is_the_first_untrusted_hop():
    from fruitdask.serve.limits import client_key, parse_networks

    trusted = parse_networks("10.0.0.0/8, 192.168.1.1")
    assert client_key("198.51.100.9", "1.2.3.4", trusted) == "198.51.100.9"  # not from a proxy: the header is ignored
    assert client_key("10.1.2.3", "1.2.3.4, 198.51.100.7, 192.168.1.1", trusted) == "198.51.100.7"
    assert client_key("10.1.2.3", "10.9.9.9, 10.8.8.8", trusted) == "10.9.9.9"  # all trusted: the leftmost
    assert client_key("10.1.2.3", None, trusted) == "10.1.2.3"
    assert client_key("::ffff:10.1.2.3", "203.0.113.5", trusted) == "203.0.113.5"  # IPv4-mapped peer
    assert client_key("10.1.2.3", "203.0.113.5", ()) == "10.1.2.3"  # nothing trusted: the peer


def test_bad_trusted_proxies_and_limits_are_refused(tmp_path, capsys):
    assert main(["serve", "--model", str(tmp_path), "--trusted-proxies", "10.0.0.0/33"]) == 2
    assert "--trusted-proxies '10.0.0.0/33' is not an address or CIDR" in capsys.readouterr().err
    assert main(["serve", "--model", str(tmp_path), "--max-uploads-per-client", "0"]) == 2
    assert "--max-uploads-per-client 0 is not usable" in capsys.readouterr().err
    assert main(["serve", "--model", str(tmp_path), "--decode-timeout", "0"]) == 2
    assert "--decode-timeout 0.0 is not usable" in capsys.readouterr().err


# --- item 8: a drain ends with the exit, and only from inside the pod ---------------------


@pytest.mark.integration
def test_get_drain_ends_with_the_process_exiting(tmp_path):
    """``GET /drain`` (the preStop hook): readiness fails, requests are served for
    ``--drain-seconds``, the hook gets its answer, then the process exits 0 by itself, with
    no SIGTERM: a pod drained by mistake is restarted by Kubernetes.

    Before the fix the process kept running, unready for good, while ``/healthz`` said 200."""
    drain_s = 2.0
    with fake_server(tmp_path, "--drain-seconds", str(drain_s)) as srv:
        start = time.monotonic()
        with ThreadPoolExecutor(1) as pool:
            hook = pool.submit(call, srv["probe"], "GET", "/drain", None, None, 30)
            time.sleep(0.5)
            assert call(srv["probe"], "GET", "/readyz")[0] == 503
            assert post_image(srv["port"], JPEG)[0] == 200  # still served during the drain
            status, _, body = hook.result(30)
        assert (status, json.loads(body)) == (200, {"status": "drained", "exiting": True})
        assert drain_s - 0.5 <= time.monotonic() - start
        assert srv["proc"].wait(20) == 0, srv["log"].read_text()
        assert time.monotonic() - start < drain_s + 10  # on its own: fake_server sends SIGTERM only after this block


def test_drain_is_refused_over_the_network():
    """``/drain`` answers 403 ``drain_local_only`` to any peer but the loopback address (the
    chart's ``exec`` hook runs inside the pod), and then nothing stops.

    Before the fix anyone who reached the probe port drained the pod for good."""
    from starlette.testclient import TestClient

    from fruitdask.serve.metrics import ServeMetrics
    from fruitdask.serve.probes import PROBE_ENDPOINTS, create_probe_app
    from fruitdask.serve.settings import ServeSettings
    from fruitdask.serve.state import ServeState

    stops: list[bool] = []
    state = ServeState(ServeSettings(drain_seconds=0), ServeMetrics(PROBE_ENDPOINTS), request_stop=lambda: stops.append(True))
    app = create_probe_app(state)
    for peer in ("192.0.2.9", "10.0.0.7", "::ffff:10.0.0.7", "testclient"):
        with TestClient(app, client=(peer, 40000)) as remote:
            got = remote.get("/drain")
        assert (got.status_code, got.json()["error"]) == (403, "drain_local_only"), peer
    assert stops == [] and state.draining_since is None
    for peer in ("127.0.0.1", "::1"):
        with TestClient(app, client=(peer, 40000)) as local:
            got = local.get("/drain")
        assert got.status_code == 200 and got.json() == {"status": "drained", "exiting": True}, peer
    assert stops == [True, True] and state.draining_since is not None


@pytest.mark.integration
def test_the_charts_prestop_exec_hook_drains_the_server(tmp_path):
    """The chart's preStop command, rendered for this server's probe port and run as the kubelet
    runs an ``exec`` hook (a process beside the server, here with this interpreter for
    ``python``): it returns 0 once the drain is done, and the server then exits 0 by itself.

    The former chart had an ``httpGet`` hook and no command (and the server did not exit)."""
    from k8s_validation import render

    with fake_server(tmp_path, "--drain-seconds", "1") as srv:
        values = {"serve": {"enabled": True, "model": "s3://fruits-eu-west-1/models/m", "probePort": srv["probe"],
                            "networkPolicy": {"egressCidrs": ["10.0.0.0/16"]}}}
        (deploy,) = [o for o in render(values) if o["kind"] == "Deployment" and o["metadata"]["name"].endswith("-serve")]
        command = deploy["spec"]["template"]["spec"]["containers"][0]["lifecycle"]["preStop"]["exec"]["command"]
        assert command[0] == "python"
        hook = subprocess.run([sys.executable, *command[1:]], cwd=tmp_path, capture_output=True, text=True, timeout=60)
        assert hook.returncode == 0, hook.stderr
        assert srv["proc"].wait(20) == 0, srv["log"].read_text()
