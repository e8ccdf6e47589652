"""Which image a server was booted from, through real novaclient against the simulator.

The pool retires VMs booted from another image than the driver's (``NovaDriver.image``); the
driver tags every server with the image as ``[nova] image`` names it and reads it back from each
listing, falling back to Nova's own ``image.id`` for servers booted without the tag.
"""

from __future__ import annotations

from tests.drivers.test_nova import IMAGE, LIST, PREFIX, NovaDriverTestCase, request
from vmcloud.drivers.nova import META_IMAGE, server_image
from vmcloud.novasim.model import CreateSpec, Image

NEW_IMAGE = "7a4d3b0e-95c4-4d0b-9a57-3c2f1e0d9b11"


class ImageTests(NovaDriverTestCase):
    def setUp(self) -> None:
        super().setUp()
        # the operator uploaded a new image (Glance and Nova share the simulator's image table)
        self.sim.cloud.images[NEW_IMAGE] = Image(NEW_IMAGE, "vmcloud-guest-20261205")

    async def test_the_driver_boots_its_image_and_lists_each_servers_own(self) -> None:
        self.assertEqual(self.driver.image, IMAGE)
        old = await self.driver.boot(request("1"))
        upgraded = self.make_driver(image=NEW_IMAGE)  # the restart with the new [nova] image
        self.assertEqual(upgraded.image, NEW_IMAGE)
        new = await upgraded.boot(request("2"))
        self.assertEqual(self.sim.cloud.get(new).image.id, NEW_IMAGE)
        self.assertEqual(self.sim.cloud.get(new).metadata[META_IMAGE], NEW_IMAGE)
        lists = self.sim.count(LIST)
        listed = {s.server_id: s.image for s in await upgraded.list_servers()}
        self.assertEqual(listed, {old: IMAGE, new: NEW_IMAGE})
        self.assertEqual({v.id: v.to_json()["image"] for v in self.sim.servers()}, listed)  # /_sim/servers
        self.assertEqual(self.sim.count(LIST) - lists, 2)  # the same one walk (a page, then empty)

    async def test_an_image_given_as_a_url_compares_as_written(self) -> None:
        url = f"http://glance.example:9292/v2/images/{NEW_IMAGE}"
        driver = self.make_driver(image=url)
        server_id = await driver.boot(request("3"))
        self.assertEqual(self.sim.cloud.get(server_id).image.id, NEW_IMAGE)  # Nova keeps the id
        [listed] = await driver.list_servers()
        self.assertEqual(listed.image, url)  # the tag: the same spelling as the driver's image

    async def test_a_server_without_the_tag_gives_novas_image_id(self) -> None:
        self.sim.cloud.create(
            CreateSpec(name=PREFIX + "9", image_ref=IMAGE, flavor_ref="1", metadata={"vmcloud-vmid": "9"}),
            project_id="demo",
            user_id="demo",
        )
        [listed] = await self.driver.list_servers()
        self.assertEqual(listed.image, IMAGE)

    def test_image_strings_are_shared_and_empty_is_unknown(self) -> None:
        a = server_image({"image": {"id": "".join(["x", "y"])}}, {})
        b = server_image({"image": {"id": "".join(["x", "y"])}}, {})
        self.assertIs(a, b)  # one string for thousands of VMs of one image
        self.assertIsNone(server_image({"image": ""}, {}))  # booted from a volume
        self.assertIsNone(server_image({}, {}))
        self.assertEqual(server_image({"image": {"id": "x"}}, {META_IMAGE: "tagged"}), "tagged")
