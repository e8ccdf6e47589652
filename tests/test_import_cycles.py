"""No module of the tree sits on an import cycle (issue #12, acceptance).

A cycle means neither module can be read, tested or moved without the other; ``if TYPE_CHECKING:``
hides one from the interpreter but not from a reader, so it counts here.  Imports inside functions
do not count: they run late, by choice.  Read from the source with ``ast``.
"""

from __future__ import annotations

from twisted.trial.unittest import SynchronousTestCase

from tests.import_graph import cycles, graph


class ImportCycleTests(SynchronousTestCase):
    def test_controller_has_no_cycle(self) -> None:
        edges = graph("vmcloud")
        self.assertIn("vmcloud.novasim.control", edges["vmcloud.novasim.simulator"])
        self.assertEqual(cycles(edges), [])

    def test_guest_has_no_cycle(self) -> None:
        self.assertEqual(cycles(graph("guest_agent")), [])

    def test_a_cycle_is_found(self) -> None:
        """The search finds a cycle through three modules and one through a module itself."""
        edges = {"a": {"b"}, "b": {"c"}, "c": {"a", "d"}, "d": set(), "e": {"e"}}
        self.assertEqual(cycles(edges), [["a", "b", "c"], ["e"]])
