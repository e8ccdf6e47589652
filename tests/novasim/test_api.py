"""The simulator's HTTP face: Keystone, Nova's answers and headers, faults, counters, control API."""

from __future__ import annotations

import base64
import json

from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase
from twisted.web._newclient import ResponseNeverReceived

from tests.novasim.helpers import BASE, PASSWORD_AUTH, SimClient
from vmcloud.novasim import CloudSettings, FaultRule, Identity


class IdentityTests(SynchronousTestCase):
    def test_password_token_carries_a_catalog_pointing_at_nova(self) -> None:
        c = SimClient()
        answer = c.call("POST", "/identity/v3/auth/tokens", PASSWORD_AUTH, token=False)
        self.assertEqual(answer.code, 201)
        self.assertTrue(answer.headers["x-subject-token"])
        catalog = {s["type"]: s for s in answer.body["token"]["catalog"]}
        urls = {e["interface"]: e["url"] for e in catalog["compute"]["endpoints"]}
        self.assertEqual(urls["public"], f"{BASE}/v2.1")
        self.assertEqual(catalog["compute"]["endpoints"][0]["region_id"], "RegionOne")
        self.assertTrue(answer.body["token"]["expires_at"].endswith("Z"))

    def test_wrong_password_is_401_with_keystones_body(self) -> None:
        c = SimClient()
        body = {"auth": {**PASSWORD_AUTH["auth"]}}
        body["auth"]["identity"] = {
            "methods": ["password"],
            "password": {"user": {"name": "demo", "password": "x", "domain": {"name": "Default"}}},
        }
        answer = c.call("POST", "/identity/v3/auth/tokens", body, token=False)
        self.assertEqual(answer.code, 401)
        self.assertEqual(answer.body["error"]["code"], 401)

    def test_application_credential_and_discovery(self) -> None:
        c = SimClient()
        auth = {
            "auth": {
                "identity": {
                    "methods": ["application_credential"],
                    "application_credential": {"id": "vmcloud-sim-appcred", "secret": "appcred-secret"},
                }
            }
        }
        self.assertEqual(c.call("POST", "/identity/v3/auth/tokens", auth, token=False).code, 201)
        versions = c.call("GET", "/identity", token=False)
        self.assertEqual(versions.code, 300)
        self.assertEqual(versions.body["versions"]["values"][0]["links"][0]["href"], f"{BASE}/identity/v3/")

    def test_nova_refuses_missing_and_revoked_tokens(self) -> None:
        c = SimClient()
        self.assertEqual(c.call("GET", "/v2.1/servers").code, 200)
        self.assertEqual(c.call("GET", "/v2.1/servers", token=False).code, 401)
        self.assertEqual(c.sim.revoke_tokens(), 1)
        refused = c.call("GET", "/v2.1/servers")
        self.assertEqual(refused.code, 401)
        self.assertIn("Keystone uri=", refused.headers["www-authenticate"])
        c.login()
        self.assertEqual(c.call("GET", "/v2.1/servers").code, 200)

    def test_non_ascii_secrets_are_refused_not_crashed_on(self) -> None:
        c = SimClient(identity=Identity(static_token="tok"))
        self.assertEqual(
            c.call("GET", "/v2.1/servers", token=False, headers={"X-Auth-Token": "tök"}).code, 401
        )
        self.assertEqual(
            c.call("GET", "/v2.1/servers", token=False, headers={"X-Auth-Token": "tok"}).code, 200
        )
        body = {"auth": {**PASSWORD_AUTH["auth"]}}
        user = {"name": "demo", "password": "sécret", "domain": {"name": "Default"}}
        body["auth"]["identity"] = {"methods": ["password"], "password": {"user": user}}
        self.assertEqual(c.call("POST", "/identity/v3/auth/tokens", body, token=False).code, 401)

    def test_malformed_auth_body_is_400(self) -> None:
        c = SimClient()
        answer = c.call("POST", "/identity/v3/auth/tokens", raw=b"{nope", token=False)
        self.assertEqual(answer.code, 400)


class ComputeTests(SynchronousTestCase):
    def test_microversion_headers_are_echoed(self) -> None:
        c = SimClient()
        for mv in ("2.1", "2.47", "2.96"):
            answer = c.call("GET", "/v2.1/servers", mv=mv)
            self.assertEqual(answer.headers["x-openstack-nova-api-version"], mv)
            self.assertEqual(answer.headers["openstack-api-version"], f"compute {mv}")
            self.assertTrue(answer.headers["x-compute-request-id"].startswith("req-"))
        plain = c.call("GET", "/v2.1/servers")
        self.assertEqual(plain.headers["x-openstack-nova-api-version"], "2.1")

    def test_unsupported_microversion_is_406(self) -> None:
        c = SimClient()
        answer = c.call("GET", "/v2.1/servers", mv="2.999")
        self.assertEqual(answer.code, 406)
        self.assertEqual(
            answer.body["computeFault"]["message"],
            "Version 2.999 is not supported by the API. Minimum is 2.1 and maximum is 2.96.",
        )

    def test_flavor_is_embedded_from_247(self) -> None:
        c = SimClient()
        sid = c.boot("pool-1")
        old = c.call("GET", f"/v2.1/servers/{sid}", mv="2.46").body["server"]["flavor"]
        new = c.call("GET", f"/v2.1/servers/{sid}", mv="2.47").body["server"]["flavor"]
        self.assertEqual(old["id"], "1")
        self.assertEqual(new["original_name"], "m1.tiny")

    def test_user_data_and_metadata_reach_the_server(self) -> None:
        seen = []
        c = SimClient(CloudSettings(build_seconds=1), on_active=seen.append)
        c.boot(
            "pool-1",
            user_data=base64.b64encode(b"[agent]\nlogin = a\n").decode(),
            metadata={"vmcloud-vmid": "7"},
        )
        c.clock.advance(1)
        [view] = seen
        self.assertEqual(view.user_data, b"[agent]\nlogin = a\n")
        self.assertEqual(view.metadata, {"vmcloud-vmid": "7"})

    def test_bad_create_bodies(self) -> None:
        c = SimClient()
        base = {"name": "x", "imageRef": "155d900f-4e14-4e4c-a73d-069cbf4541e6", "flavorRef": "1"}
        cases = [
            (b"not json", "Malformed request body"),
            (json.dumps({"server": {**base, "user_data": "%%%"}}).encode(), "'%%%' is not a 'base64'"),
            (json.dumps({"server": {**base, "metadata": {"k": 1}}}).encode(), "is not of type 'string'"),
        ]
        for raw, message in cases:
            answer = c.call("POST", "/v2.1/servers", raw=raw)
            self.assertEqual(answer.code, 400, raw)
            self.assertIn(message, answer.body["badRequest"]["message"])
        self.assertEqual(c.sim.servers(), [])

    def test_oversized_body_is_413(self) -> None:
        c = SimClient()
        answer = c.call("POST", "/v2.1/servers", raw=b"x" * 200_000)
        self.assertEqual(answer.code, 413)

    def test_list_pages_with_next_links(self) -> None:
        c = SimClient(CloudSettings(max_limit=3))
        for n in range(7):
            c.boot(f"pool-{n}")
        first = c.call("GET", "/v2.1/servers/detail?name=%5Epool-")
        self.assertEqual(len(first.body["servers"]), 3)
        link = first.body["servers_links"][0]["href"]
        self.assertTrue(link.startswith(f"{BASE}/v2.1/servers/detail?name=%5Epool-&marker="), link)
        names = []
        marker = None
        while True:
            page = c.call("GET", "/v2.1/servers/detail" + (f"?marker={marker}" if marker else "")).body[
                "servers"
            ]
            if not page:
                break
            names += [s["name"] for s in page]
            marker = page[-1]["id"]
        self.assertEqual(sorted(names), [f"pool-{n}" for n in range(7)])
        self.assertEqual(c.call("GET", "/v2.1/servers?marker=nope").code, 400)
        self.assertEqual(c.call("GET", "/v2.1/servers?limit=x").code, 400)

    def test_unknown_paths_and_methods(self) -> None:
        c = SimClient()
        self.assertEqual(c.call("GET", "/v2.1/nothing").body["itemNotFound"]["code"], 404)
        self.assertEqual(c.call("PATCH", "/v2.1/servers").code, 405)

    def test_a_handler_crash_is_a_logged_500_not_a_traceback(self) -> None:
        c = SimClient()

        def broken(*args: object) -> None:
            raise RuntimeError("boom")

        c.sim.cloud.page = broken  # type: ignore[method-assign]
        answer = c.call("GET", "/v2.1/servers")
        self.assertEqual(answer.code, 500)
        self.assertNotIn(b"Traceback", answer.raw)
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)


class FaultTests(SynchronousTestCase):
    def test_next_n_errors_then_normal(self) -> None:
        c = SimClient()
        c.login()
        c.sim.inject_next(FaultRule(status=503), 2)
        codes = [c.call("GET", "/v2.1/servers").code for _ in range(3)]
        self.assertEqual(codes, [503, 503, 200])

    def test_rate_limit_carries_retry_after(self) -> None:
        c = SimClient()
        c.login()
        for status in (413, 429):
            c.sim.inject_next(FaultRule(status=status, retry_after=7))
            answer = c.call("GET", "/v2.1/servers")
            self.assertEqual((answer.code, answer.headers["retry-after"]), (status, "7"))
            self.assertEqual(answer.body["overLimit"]["code"], status)

    def test_rules_match_route_labels_only(self) -> None:
        c = SimClient()
        c.login()
        c.sim.set_fault_rate(FaultRule(status=500, match="^POST /v2.1/servers$"), 1.0)
        self.assertEqual(c.call("GET", "/v2.1/servers/detail").code, 200)
        answer = c.call(
            "POST",
            "/v2.1/servers",
            {"server": {"name": "x", "imageRef": "155d900f-4e14-4e4c-a73d-069cbf4541e6", "flavorRef": "1"}},
        )
        self.assertEqual(answer.code, 500)
        self.assertIn("computeFault", answer.body)
        self.assertEqual(c.sim.servers(), [])
        c.sim.clear_faults()
        c.boot("pool-1")

    def test_gateway_errors_are_html(self) -> None:
        c = SimClient()
        c.login()
        for status in (502, 503, 504):
            c.sim.inject_next(FaultRule(status=status))
            answer = c.call("GET", "/v2.1/servers")
            self.assertEqual(answer.code, status)
            self.assertIn(b"<html>", answer.raw)

    def test_dropped_connection(self) -> None:
        c = SimClient()
        c.login()
        c.sim.inject_next(FaultRule(kind="drop"))
        result = c.finish(c.start(c.send("GET", "/v2.1/servers")))
        assert isinstance(result, Failure)
        self.assertTrue(result.check(ResponseNeverReceived))

    def test_slow_answer_waits_for_the_clock_and_still_acts(self) -> None:
        c = SimClient()
        c.login()
        c.sim.inject_next(FaultRule(kind="slow", delay=30))
        pending = c.start(
            c.send(
                "POST",
                "/v2.1/servers",
                {
                    "server": {
                        "name": "slow-1",
                        "imageRef": "155d900f-4e14-4e4c-a73d-069cbf4541e6",
                        "flavorRef": "1",
                    }
                },
            )
        )
        self.assertEqual(pending, [])
        self.assertEqual(c.sim.servers(), [])
        c.clock.advance(30)
        answer = c.finish(pending)
        assert not isinstance(answer, Failure)
        self.assertEqual(answer.code, 202)
        self.assertEqual([s.name for s in c.sim.servers()], ["slow-1"])

    def test_counters_name_routes(self) -> None:
        c = SimClient()
        sid = c.boot("pool-1")
        c.call("GET", f"/v2.1/servers/{sid}")
        c.call("GET", "/v2.1/servers/detail?name=%5Epool-")
        c.call("DELETE", f"/v2.1/servers/{sid}")
        self.assertEqual(
            c.sim.counts(),
            {
                "POST /identity/v3/auth/tokens": 1,
                "POST /v2.1/servers": 1,
                "GET /v2.1/servers/{id}": 1,
                "GET /v2.1/servers/detail": 1,
                "DELETE /v2.1/servers/{id}": 1,
            },
        )


class ControlApiTests(SynchronousTestCase):
    def test_settings_faults_servers_counters_revoke(self) -> None:
        c = SimClient()
        changed = c.call(
            "POST",
            "/_sim/settings",
            {"build_seconds": 0.5, "boot_rules": [{"pattern": "^bad", "outcome": "error"}]},
            token=False,
        )
        self.assertEqual(changed.code, 200)
        self.assertEqual(changed.body["build_seconds"], 0.5)
        c.boot("bad-1")
        c.boot("good-1")
        c.clock.advance(0.5)
        servers = c.call("GET", "/_sim/servers", token=False).body["servers"]
        self.assertEqual({s["name"]: s["status"] for s in servers}, {"bad-1": "ERROR", "good-1": "ACTIVE"})
        self.assertEqual(
            c.call("GET", "/_sim/counters", token=False).body["counters"]["POST /v2.1/servers"], 2
        )
        self.assertEqual(c.call("DELETE", "/_sim/counters", token=False).code, 204)
        self.assertEqual(c.sim.counts(), {})
        fault = c.call(
            "POST",
            "/_sim/faults",
            {"kind": "status", "status": 429, "retry_after": 3, "count": 1},
            token=False,
        )
        self.assertEqual(fault.body["next"][0]["status"], 429)
        self.assertEqual(c.call("GET", "/v2.1/servers").code, 429)
        self.assertEqual(c.call("POST", "/_sim/revoke", token=False).body, {"revoked": 1})
        self.assertEqual(c.call("GET", "/v2.1/servers").code, 401)

    def test_bad_control_input_is_a_clear_400(self) -> None:
        c = SimClient()
        cases = [
            ("/_sim/settings", {"build_seconds": "soon"}, "build_seconds must be a number"),
            ("/_sim/settings", {"nonsense": 1}, "unknown setting 'nonsense'"),
            (
                "/_sim/settings",
                {"boot_rules": [{"pattern": "(", "outcome": "error"}]},
                "not a regular expression",
            ),
            ("/_sim/faults", {"kind": "status", "status": 200, "count": 1}, "4xx or 5xx"),
            ("/_sim/faults", {"kind": "status"}, "exactly one of count"),
        ]
        for path, body, message in cases:
            answer = c.call("POST", path, body, token=False)
            self.assertEqual(answer.code, 400, body)
            self.assertEqual(answer.body["error"], "bad-request")
            self.assertIn(message, answer.body["message"])
        self.assertEqual(c.call("GET", "/_sim/nothing", token=False).code, 404)
        self.assertEqual(c.call("POST", "/_sim/settings", raw=b"[1", token=False).code, 400)
