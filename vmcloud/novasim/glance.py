"""The slice of Glance v2 python-novaclient uses to turn image names into ids (``glance.find_image``)."""

from __future__ import annotations

from collections.abc import Mapping

from vmcloud.novasim.exchange import Handler, Match, Reply, Routes, SimRequest
from vmcloud.novasim.identity import TokenStore, unauthorized
from vmcloud.novasim.model import Image
from vmcloud.novasim.views import image_detail


class ImageApi:
    """``/image``: version list, image list (``?name=``) and image by id."""

    def __init__(self, images: Mapping[str, Image], tokens: TokenStore) -> None:
        self.images = images
        self.tokens = tokens
        routes: Routes[Handler] = Routes()
        routes.add("GET", "/image/v2/images", self._list)
        routes.add("GET", "/image/v2/images/{id}", self._show)
        self.routes = routes

    def route(self, request: SimRequest) -> Match:
        if request.method == "GET" and request.path.rstrip("/") in ("/image", "/image/v2"):
            return Match("GET /image", self._versions, {})
        found = self.routes.match(request.method, request.path)
        if found is None:
            return Match(f"{request.method} <unknown>", lambda req, _: _glance_error(404, "Not Found"), {})
        label, handler, params = found

        def checked(req: SimRequest, params: Mapping[str, str]) -> Reply:
            if not self.tokens.valid(req.header("x-auth-token")):
                return unauthorized(req.base_url)
            return handler(req, params)

        return Match(label, checked, params)

    def _versions(self, request: SimRequest, _: Mapping[str, str]) -> Reply:
        link = [{"rel": "self", "href": f"{request.base_url}/image/v2/"}]
        return Reply(300, {"versions": [{"id": "v2.16", "status": "CURRENT", "links": link}]})

    def _list(self, request: SimRequest, _: Mapping[str, str]) -> Reply:
        name = request.param("name")
        images = [i for i in self.images.values() if name is None or i.name == name]
        return Reply(
            200,
            {
                "images": [image_detail(i, request.base_url) for i in images],
                "first": "/v2/images",
                "schema": "/v2/schemas/images",
            },
        )

    def _show(self, request: SimRequest, params: Mapping[str, str]) -> Reply:
        image = self.images.get(params["id"])
        if image is None:
            return _glance_error(404, "Not Found", f"No image found with ID {params['id']}")
        return Reply(200, image_detail(image, request.base_url))


def _glance_error(status: int, title: str, detail: str = "The resource could not be found.") -> Reply:
    text = (
        f"<html>\n <head>\n  <title>{status} {title}</title>\n </head>\n"
        f" <body>\n  <h1>{status} {title}</h1>\n  {detail}<br /><br />\n\n\n\n </body>\n</html>"
    )
    return Reply(status, text.encode(), content_type="text/html; charset=UTF-8")
