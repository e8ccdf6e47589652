"""The simulated Nova API (``/v2.1``): microversions, validation and errors as the real nova-api.

Every reply under ``/v2.1`` carries the microversion headers of the request and a request id, as
real Nova does; error bodies are ``{"<kind>": {"code", "message"}}`` with the captured messages.
Listing honours ``limit`` (capped at ``max_limit``) and ``marker`` exactly, newest first, so
python-novaclient's ``limit=-1`` loop ends.
"""

from __future__ import annotations

import re
import secrets
import string
import uuid
from collections import OrderedDict
from collections.abc import Callable, Mapping
from typing import Literal
from urllib.parse import urlencode

from vmcloud.novasim.exchange import Match, Reply, Routes, SimRequest
from vmcloud.novasim.identity import TokenStore, unauthorized
from vmcloud.novasim.model import (
    MAX_METADATA_ITEMS,
    ApiFault,
    CreateSpec,
    ListFilter,
    NovaCloud,
    bad_request,
    is_base64,
    not_found,
)
from vmcloud.novasim.views import (
    MAX_VERSION,
    MIN_VERSION,
    Calendar,
    Version,
    fault_body,
    flavor_brief,
    flavor_detail,
    server_brief,
    server_created,
    server_detail,
    version_document,
    versions_document,
)

VARY = "OpenStack-API-Version, X-OpenStack-Nova-API-Version"
ERROR_CONTENT_TYPE = "application/json; charset=UTF-8"
MAX_USER_DATA = 65535
_VERSION_RE = re.compile(r"^([1-9]\d*)\.(0|[1-9]\d*)$")
_METADATA_KEY_RE = re.compile(r"^[a-zA-Z0-9-_:. /]{1,255}$")
_UUID_RE = re.compile(r"^[0-9a-fA-F]{8}-?[0-9a-fA-F]{4}-?[0-9a-fA-F]{4}-?[0-9a-fA-F]{4}-?[0-9a-fA-F]{12}$")


#: A route handler; it gets the negotiated microversion as its third argument.
_Handler = Callable[[SimRequest, Mapping[str, str], Version], Reply]
_Plain = Callable[[SimRequest, Mapping[str, str]], Reply]


def _invalid(field: str, value: object, reason: str) -> ApiFault:
    return bad_request(f"Invalid input for field/attribute {field}. Value: {value}. {reason}")


def _invalid_query(name: str, value: str, reason: str) -> ApiFault:
    return bad_request(f"Invalid input for query parameters {name}. Value: {value}. {reason}")


class ComputeApi:
    """Routes and handlers of the compute endpoint; token checks and microversions included."""

    def __init__(self, cloud: NovaCloud, tokens: TokenStore, cal: Calendar) -> None:
        self.cloud = cloud
        self.tokens = tokens
        self.cal = cal
        r: Routes[_Handler] = Routes()
        r.add("GET", "/v2.1/servers/detail", self._list_detail)
        r.add("GET", "/v2.1/servers", self._list_brief)
        r.add("POST", "/v2.1/servers", self._create)
        r.add("GET", "/v2.1/servers/{id}/ips", self._ips)
        r.add("GET", "/v2.1/servers/{id}/ips/{label}", self._ips_of)
        r.add("GET", "/v2.1/servers/{id}/metadata", self._metadata_get)
        r.add("POST", "/v2.1/servers/{id}/metadata", self._metadata_merge)
        r.add("PUT", "/v2.1/servers/{id}/metadata", self._metadata_replace)
        r.add("GET", "/v2.1/servers/{id}/metadata/{key}", self._meta_item_get)
        r.add("PUT", "/v2.1/servers/{id}/metadata/{key}", self._meta_item_put)
        r.add("DELETE", "/v2.1/servers/{id}/metadata/{key}", self._meta_item_delete)
        r.add("GET", "/v2.1/servers/{id}", self._show)
        r.add("DELETE", "/v2.1/servers/{id}", self._delete)
        r.add("GET", "/v2.1/flavors/detail", self._flavors_detail)
        r.add("GET", "/v2.1/flavors", self._flavors_brief)
        r.add("GET", "/v2.1/flavors/{id}", self._flavor)
        self.routes = r

    # ------------------------------------------------------------------ dispatch

    def route(self, request: SimRequest) -> Match:
        """Route without running: the web layer counts the label, then injects faults or runs it."""
        path = request.path
        if request.method == "GET" and path in ("", "/"):
            return Match("GET /", lambda req, _: Reply(200, versions_document(req.base_url)), {})
        if request.method == "GET" and path.rstrip("/") == "/v2.1":
            return Match(
                "GET /v2.1",
                self._versioned(lambda req, _, __: Reply(200, version_document(req.base_url))),
                {},
            )
        found = self.routes.match(request.method, path)
        if found is not None:
            label, handler, params = found
            return Match(label, self._versioned(self._authenticated(handler)), params)
        if self.routes.knows(path):
            fault = ApiFault(405, "computeFault", "The method is not allowed for the requested URL.")
        else:
            fault = not_found("The resource could not be found.")
        return Match(f"{request.method} <unknown>", self._versioned(_raiser(fault)), {})

    def _authenticated(self, handler: _Handler) -> _Handler:
        def check(request: SimRequest, params: Mapping[str, str], version: Version) -> Reply:
            if not self.tokens.valid(request.header("x-auth-token")):
                return unauthorized(request.base_url)
            return handler(request, params, version)

        return check

    def _versioned(self, handler: _Handler) -> _Plain:
        def run(request: SimRequest, params: Mapping[str, str]) -> Reply:
            request_id = f"req-{uuid.uuid4()}"
            requested, version, error = _requested_version(request)
            try:
                if error is not None:
                    raise error
                assert version is not None
                reply = handler(request, params, version)
            except ApiFault as fault:
                reply = Reply(fault.status, fault_body(fault.status, fault.kind, fault.message))
            if reply.status >= 400 and reply.content_type == "application/json":
                reply = Reply(reply.status, reply.body, reply.headers, ERROR_CONTENT_TYPE)
            headers = {
                **reply.headers,
                "OpenStack-API-Version": f"compute {requested}",
                "X-OpenStack-Nova-API-Version": requested,
                "Vary": VARY,
                "x-openstack-request-id": request_id,
                "x-compute-request-id": request_id,
            }
            return Reply(reply.status, reply.body, headers, reply.content_type)

        return run

    # ------------------------------------------------------------------ servers

    def _list_detail(self, request: SimRequest, _: Mapping[str, str], version: Version) -> Reply:
        return self._list(request, version, detailed=True)

    def _list_brief(self, request: SimRequest, _: Mapping[str, str], version: Version) -> Reply:
        return self._list(request, version, detailed=False)

    def _list(self, request: SimRequest, version: Version, *, detailed: bool) -> Reply:
        max_limit = self.cloud.settings.max_limit
        limit = max_limit
        raw_limit = request.param("limit")
        if raw_limit is not None:
            if not raw_limit.isdigit():
                raise _invalid_query(
                    "limit", raw_limit, f"'{raw_limit}' is not a 'positive_integer_with_empty_str'"
                )
            limit = min(int(raw_limit), max_limit)
        servers = self.cloud.page(self._filters(request), request.param("marker"), limit)
        base = request.base_url
        items = [
            server_detail(s, version, base, self.cal, listed=True) if detailed else server_brief(s, base)
            for s in servers
        ]
        body: dict[str, object] = {"servers": items}
        if limit and len(servers) == limit:
            params: OrderedDict[str, str] = OrderedDict(
                sorted((k, v) for k, v in dict(request.query).items())
            )
            params["marker"] = servers[-1].id
            collection = "servers/detail" if detailed else "servers"
            body["servers_links"] = [{"rel": "next", "href": f"{base}/v2.1/{collection}?{urlencode(params)}"}]
        return Reply(200, body)

    def _filters(self, request: SimRequest) -> ListFilter:
        name = request.param("name")
        pattern = None
        if name:
            try:
                pattern = re.compile(name)
            except re.error:
                raise _invalid_query("name", name, f"'{name}' is not a 'regex'") from None
        status = request.param("status")
        since = request.param("changes-since")
        changes_since = None
        if since:
            try:
                changes_since = self.cal.parse(since)
            except ValueError:
                raise _invalid_query("changes-since", since, f"'{since}' is not a 'date-time'") from None
        return ListFilter(
            name=pattern, status=status.upper() if status else None, changes_since=changes_since
        )

    def _show(self, request: SimRequest, params: Mapping[str, str], version: Version) -> Reply:
        server = self.cloud.get(params["id"])
        return Reply(
            200, {"server": server_detail(server, version, request.base_url, self.cal, listed=False)}
        )

    def _delete(self, request: SimRequest, params: Mapping[str, str], version: Version) -> Reply:
        self.cloud.delete(params["id"])
        return Reply(204)

    def _ips(self, request: SimRequest, params: Mapping[str, str], version: Version) -> Reply:
        return Reply(200, {"addresses": self.cloud.get(params["id"]).addresses})

    def _ips_of(self, request: SimRequest, params: Mapping[str, str], version: Version) -> Reply:
        addresses = self.cloud.get(params["id"]).addresses
        label = params["label"]
        if label not in addresses:
            raise not_found("Network could not be found")
        return Reply(200, {label: addresses[label]})

    def _create(self, request: SimRequest, _: Mapping[str, str], version: Version) -> Reply:
        spec = parse_create(request, version)
        servers = self.cloud.create(
            spec, project_id=self.tokens.identity.project_id, user_id=self.tokens.identity.user_id
        )
        first = servers[0]
        admin_pass = "".join(secrets.choice(string.ascii_letters + string.digits) for _ in range(12))
        return Reply(
            202,
            server_created(first, request.base_url, admin_pass),
            headers={"location": f"{request.base_url}/v2.1/servers/{first.id}"},
        )

    # ------------------------------------------------------------------ metadata

    def _metadata_get(self, request: SimRequest, params: Mapping[str, str], version: Version) -> Reply:
        return Reply(200, {"metadata": dict(self.cloud.get(params["id"]).metadata)})

    def _metadata_merge(self, request: SimRequest, params: Mapping[str, str], version: Version) -> Reply:
        metadata = _metadata_from(_body(request), "metadata")
        return Reply(200, {"metadata": self.cloud.set_metadata(params["id"], metadata, replace=False)})

    def _metadata_replace(self, request: SimRequest, params: Mapping[str, str], version: Version) -> Reply:
        metadata = _metadata_from(_body(request), "metadata")
        return Reply(200, {"metadata": self.cloud.set_metadata(params["id"], metadata, replace=True)})

    def _meta_item_get(self, request: SimRequest, params: Mapping[str, str], version: Version) -> Reply:
        metadata = self.cloud.get(params["id"]).metadata
        key = params["key"]
        if key not in metadata:
            raise not_found("Metadata item was not found")
        return Reply(200, {"meta": {key: metadata[key]}})

    def _meta_item_put(self, request: SimRequest, params: Mapping[str, str], version: Version) -> Reply:
        item = _metadata_from(_body(request), "meta")
        key = params["key"]
        if len(item) != 1:
            raise bad_request("Request body contains too many items")
        if key not in item:
            raise bad_request("Request body and URI mismatch")
        self.cloud.set_metadata(params["id"], item, replace=False)
        return Reply(200, {"meta": dict(item)})

    def _meta_item_delete(self, request: SimRequest, params: Mapping[str, str], version: Version) -> Reply:
        self.cloud.delete_metadata_item(params["id"], params["key"])
        return Reply(204)

    # ------------------------------------------------------------------ flavors

    def _flavors_brief(self, request: SimRequest, _: Mapping[str, str], version: Version) -> Reply:
        flavors = self.cloud.flavors.values()
        return Reply(200, {"flavors": [flavor_brief(f, request.base_url, version) for f in flavors]})

    def _flavors_detail(self, request: SimRequest, _: Mapping[str, str], version: Version) -> Reply:
        flavors = self.cloud.flavors.values()
        return Reply(200, {"flavors": [flavor_detail(f, request.base_url, version) for f in flavors]})

    def _flavor(self, request: SimRequest, params: Mapping[str, str], version: Version) -> Reply:
        flavor = self.cloud.flavors.get(params["id"])
        if flavor is None:
            raise not_found(f"Flavor {params['id']} could not be found.")
        return Reply(200, {"flavor": flavor_detail(flavor, request.base_url, version)})


def _raiser(fault: ApiFault) -> _Handler:
    def raise_it(request: SimRequest, params: Mapping[str, str], version: Version) -> Reply:
        raise fault

    return raise_it


def _requested_version(request: SimRequest) -> tuple[str, Version | None, ApiFault | None]:
    """The microversion asked for (echoed as sent), the one to use, or the refusal."""
    text = None
    combined = request.header("openstack-api-version")
    if combined:
        for part in combined.split(","):
            service, _, value = part.strip().partition(" ")
            if service.lower() == "compute" and value.strip():
                text = value.strip()
    if text is None:
        text = request.header("x-openstack-nova-api-version")
    if not text:
        return "2.1", MIN_VERSION, None
    if text.lower() == "latest":
        return f"{MAX_VERSION[0]}.{MAX_VERSION[1]}", MAX_VERSION, None
    found = _VERSION_RE.match(text)
    if not found:
        return (
            text,
            None,
            bad_request(
                f"API Version String {text} is of invalid format. Must be of format MajorNum.MinorNum."
            ),
        )
    version = (int(found.group(1)), int(found.group(2)))
    if not MIN_VERSION <= version <= MAX_VERSION:
        return (
            text,
            None,
            ApiFault(
                406,
                "computeFault",
                f"Version {text} is not supported by the API. Minimum is {MIN_VERSION[0]}.{MIN_VERSION[1]} "
                f"and maximum is {MAX_VERSION[0]}.{MAX_VERSION[1]}.",
            ),
        )
    return text, version, None


def _body(request: SimRequest) -> object:
    try:
        return request.json()
    except (ValueError, UnicodeDecodeError):
        raise bad_request("Malformed request body") from None


def _metadata_from(body: object, key: str) -> dict[str, str]:
    if not isinstance(body, dict) or key not in body:
        raise _invalid("body", body, f"'{key}' is a required property")
    return _check_metadata(body[key], key)


def _check_metadata(metadata: object, field: str) -> dict[str, str]:
    if not isinstance(metadata, dict):
        raise _invalid(field, metadata, f"{metadata!r} is not of type 'object'")
    for key, value in metadata.items():
        if not _METADATA_KEY_RE.match(key):
            raise _invalid(
                field, metadata, f"'{key}' does not match any of the regexes: '^[a-zA-Z0-9-_:. /]{{1,255}}$'"
            )
        if not isinstance(value, str) or len(value) > 255:
            raise _invalid(
                f"{field}.{key}", value, f"{value!r} is not of type 'string' of at most 255 characters"
            )
    if len(metadata) > MAX_METADATA_ITEMS:
        raise ApiFault(
            403, "forbidden", f"Quota exceeded for metadata_items: maximum is {MAX_METADATA_ITEMS}"
        )
    return dict(metadata)


def parse_create(request: SimRequest, version: Version) -> CreateSpec:
    """Validate a ``POST /servers`` body the way Nova's JSON schema does, with its messages."""
    body = _body(request)
    if not isinstance(body, dict) or not isinstance(body.get("server"), dict):
        raise _invalid("body", body, "'server' is a required property")
    server = body["server"]
    for required in ("name", "flavorRef"):
        if required not in server:
            raise _invalid("server", server, f"'{required}' is a required property")
    if version >= (2, 37) and "networks" not in server:
        raise _invalid("server", server, "'networks' is a required property")
    name = server["name"]
    if not isinstance(name, str) or not 1 <= len(name) <= 255 or name.strip() != name:
        raise _invalid("name", name, f"{name!r} does not match the server name rules")
    image_ref = server.get("imageRef", "")
    if not isinstance(image_ref, str):
        raise _invalid("imageRef", image_ref, f"{image_ref!r} is not valid under any of the given schemas")
    image_id = image_ref.rstrip("/").rsplit("/", 1)[-1]
    if image_ref and not image_ref.startswith(("http://", "https://")) and not _UUID_RE.match(image_ref):
        raise _invalid("imageRef", image_ref, f"'{image_ref}' is not valid under any of the given schemas")
    flavor_ref = server["flavorRef"]
    if not isinstance(flavor_ref, str | int) or isinstance(flavor_ref, bool):
        raise _invalid("flavorRef", flavor_ref, f"{flavor_ref!r} is not valid under any of the given schemas")
    flavor_id = str(flavor_ref).rstrip("/").rsplit("/", 1)[-1]
    networks = _parse_networks(server.get("networks"), version, present="networks" in server)
    metadata = _check_metadata(server.get("metadata", {}), "metadata")
    user_data = server.get("user_data")
    if user_data is not None:
        if not isinstance(user_data, str) or not is_base64(user_data):
            raise _invalid("user_data", user_data, f"'{user_data}' is not a 'base64'")
        if len(user_data) > MAX_USER_DATA:
            raise _invalid("user_data", "...", f"is too long (more than {MAX_USER_DATA} characters)")
    key_name = server.get("key_name")
    if key_name is not None and not isinstance(key_name, str):
        raise _invalid("key_name", key_name, f"{key_name!r} is not of type 'string'")
    groups = server.get("security_groups", [{"name": "default"}])
    if not isinstance(groups, list) or not all(
        isinstance(g, dict) and isinstance(g.get("name"), str) for g in groups
    ):
        raise _invalid("security_groups", groups, f"{groups!r} is not a list of {{'name': string}}")
    counts = []
    for field in ("min_count", "max_count"):
        value = server.get(field, 1)
        if isinstance(value, str) and value.isdigit():
            value = int(value)
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise _invalid(field, value, f"{value!r} is less than the minimum of 1")
        counts.append(value)
    min_count = counts[0]
    max_count = counts[1] if "max_count" in server else min_count
    if min_count > max_count:
        raise bad_request("min_count must be <= max_count")
    return CreateSpec(
        name=name,
        image_ref=image_id,
        flavor_ref=flavor_id,
        metadata=metadata,
        user_data=user_data,
        networks=networks,
        key_name=key_name,
        security_groups=tuple(g["name"] for g in groups),
        min_count=min_count,
        max_count=max_count,
    )


def _parse_networks(
    value: object, version: Version, *, present: bool
) -> tuple[str, ...] | Literal["auto", "none"]:
    if not present:
        return "auto"
    if isinstance(value, str):
        if version >= (2, 37) and value in ("auto", "none"):
            return "auto" if value == "auto" else "none"
        raise _invalid("networks", value, f"'{value}' is not of type 'array'")
    if not isinstance(value, list):
        raise _invalid("networks", value, f"{value!r} is not of type 'array'")
    ids: list[str] = []
    for item in value:
        if not isinstance(item, dict) or not any(k in item for k in ("uuid", "port", "fixed_ip")):
            raise _invalid("networks", value, f"{item!r} is not valid under any of the given schemas")
        net = item.get("uuid")
        if net is not None:
            if not isinstance(net, str) or not _UUID_RE.match(net):
                raise _invalid("networks[0].uuid", net, f"{net!r} is not a 'uuid'")
            ids.append(net)
    return tuple(ids)
