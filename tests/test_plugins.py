"""twistd finds both services once vmcloud is installed."""

from twisted.application.service import IServiceMaker
from twisted.plugin import getPlugins
from twisted.trial.unittest import SynchronousTestCase


class PluginTests(SynchronousTestCase):
    def test_both_plugins_found(self) -> None:
        names = {maker.tapname: maker for maker in getPlugins(IServiceMaker)}
        self.assertIn("vmcloud", names)
        self.assertIn("vmcloud-guest", names)
        self.assertEqual(names["vmcloud"].module, "vmcloud.tap")
        self.assertEqual(names["vmcloud-guest"].module, "guest_agent.tap")
