"""The guest stands alone (issue #12, point 6): it shares words with the controller, nothing else.

The guest agent runs inside every VM.  What it may take from the controller's tree is what both
sides speak (``vmcloud.words``: the words and their value types; ``vmcloud.stomp``: the codec and
client) and generic helpers.  Anything else would drag the controller's rooms (pool, drivers, API)
into the guest's image and tie the guest's release to their changes.  Read from the source with
``ast``, so an import inside a function counts as much as one at the top.
"""

from __future__ import annotations

from pathlib import Path

from twisted.trial.unittest import SynchronousTestCase

from tests.import_graph import imports, modules

#: What the guest may import of ``vmcloud``: a name or a package of names.
ALLOWED = ("vmcloud.words", "vmcloud.stomp", "vmcloud.service", "vmcloud.threads", "vmcloud.boundedjson")


def allowed(name: str) -> bool:
    return any(name == a or name.startswith(a + ".") for a in ALLOWED)


class GuestImportsTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.guest = modules("guest_agent")
        self.controller = modules("vmcloud")
        self.known = set(self.guest) | set(self.controller)

    def direct(self) -> dict[str, set[str]]:
        """Each guest module with the names of ``vmcloud`` it imports anywhere in its source."""
        return {
            name: {
                i
                for i in imports(name, path, self.known, module_level=False)
                if i == "vmcloud" or i.startswith("vmcloud.")
            }
            for name, path in self.guest.items()
        }

    def test_guest_imports_only_the_shared_part(self) -> None:
        wrong = {
            f"{name} imports {i}" for name, found in self.direct().items() for i in found if not allowed(i)
        }
        self.assertEqual(sorted(wrong), [])

    def test_what_the_guest_imports_stays_in_the_shared_part(self) -> None:
        """The shared modules themselves bring nothing else of the controller along."""
        todo = [i for found in self.direct().values() for i in found]
        seen: set[str] = set()
        wrong = set()
        while todo:
            name = todo.pop()
            if name in seen or name not in self.controller:
                continue
            seen.add(name)
            # Importing a.b.c runs a and a.b first: the packages count too.
            parts = name.split(".")
            todo.extend(".".join(parts[:n]) for n in range(1, len(parts)))
            for i in imports(name, self.controller[name], self.known):
                if i == "vmcloud" or i.startswith("vmcloud."):
                    if i != "vmcloud" and not allowed(i):
                        wrong.add(f"{name} imports {i}")
                    todo.append(i)
        self.assertIn("vmcloud.words.cookies", seen)
        self.assertEqual(sorted(wrong), [])

    def test_a_forbidden_import_is_seen(self) -> None:
        """The walk would see the import this test guards against, even inside a function."""
        path = self.mktemp() + ".py"
        with open(path, "w") as f:
            f.write("def f():\n    from vmcloud.pool.interfaces import Cookie\n")
        found = imports("guest_agent.x", Path(path), self.known, module_level=False)
        self.assertEqual(found, {"vmcloud.pool.interfaces"})
        self.assertFalse(allowed("vmcloud.pool.interfaces"))
