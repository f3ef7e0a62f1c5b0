"""Link definitions and the link store (wsprovider.wasmcloud1.links), without I/O."""

from twisted.trial import unittest

from tests.wasmcloud1host import consumer_link, handler_link
from wsprovider.wasmcloud1.links import LinkDefinition, LinkError, LinkStore, secret_text

P = "wsprovider"


class LinkDefinitionTests(unittest.TestCase):
    def test_roles(self):
        target = LinkDefinition.from_json(consumer_link("comp-a", P, {"URI": "x"}))
        source = LinkDefinition.from_json(handler_link("comp-a", P, {"SUBSCRIPTIONS": "a.>"}))
        self.assertEqual((target.role(P), target.component(P), target.config_for("target")),
                         ("target", "comp-a", {"URI": "x"}))
        self.assertEqual((source.role(P), source.component(P), source.config_for("source")),
                         ("source", "comp-a", {"SUBSCRIPTIONS": "a.>"}))
        other = LinkDefinition.from_json(consumer_link("comp-a", "another-provider"))
        self.assertIsNone(other.role(P))

    def test_json_round_trip_with_sealed_secrets(self):
        obj = consumer_link("comp-a", P, secrets=[120, 107, 118, 49])
        link = LinkDefinition.from_json(obj)
        self.assertEqual(link.target_secrets, b"xkv1")
        self.assertEqual(LinkDefinition.from_json(link.to_json()), link)
        self.assertNotIn("xkv1", repr(link))

    def test_malformed(self):
        for bad, words in [([], "JSON object"), ({"source_id": "", "target": P}, "source_id"),
                           (dict(consumer_link("c", P), interfaces="consumer"), "interfaces"),
                           (dict(consumer_link("c", P), target_config={"k": 1}), "target_config"),
                           (dict(consumer_link("c", P), target_secrets=[300]), "target_secrets")]:
            error = self.assertRaises(LinkError, LinkDefinition.from_json, bad)
            self.assertIn(words, str(error))

    def test_secret_values(self):
        self.assertEqual(secret_text("a", {"kind": "String", "value": "v"}), "v")
        self.assertEqual(secret_text("a", {"kind": "Bytes", "value": [104, 105]}), "hi")
        self.assertRaises(LinkError, secret_text, "a", {"kind": "Other"})
        self.assertRaises(LinkError, secret_text, "a", {"kind": "Bytes", "value": [255]})


class LinkStoreTests(unittest.TestCase):
    def test_put_is_idempotent_and_delete_of_unknown_is_harmless(self):
        store = LinkStore(P)
        link = LinkDefinition.from_json(consumer_link("comp-a", P, {"URI": "x"}))
        self.assertEqual(store.put(link), "target")
        self.assertIsNone(store.put(link))
        changed = LinkDefinition.from_json(consumer_link("comp-a", P, {"URI": "y"}))
        self.assertIsNone(store.put(changed))  # same 5-tuple: ignored until deleted, as the SDKs do
        self.assertEqual(len(store), 1)
        self.assertIsNone(store.delete(LinkDefinition.from_json(consumer_link("comp-b", P))))
        self.assertEqual(store.delete(link), ("target", link))
        self.assertIsNone(store.delete(link))
        self.assertEqual(store.put(changed), "target")

    def test_both_roles_of_one_component_are_kept(self):
        store = LinkStore(P)
        self.assertEqual(store.put(LinkDefinition.from_json(consumer_link("c", P))), "target")
        self.assertEqual(store.put(LinkDefinition.from_json(handler_link("c", P))), "source")
        self.assertIsNone(store.put(LinkDefinition.from_json(consumer_link("c", "someone-else"))))
        self.assertEqual(len(store), 2)
