"""The broker's pre-encoded MESSAGE frames are byte for byte what encoding the frame gives."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from tests.broker.support import Client, make_broker
from vmcloud.broker.protocol import _message_frame
from vmcloud.broker.realm import AckMode, Message
from vmcloud.stomp.frame import Frame

text = st.text(st.sampled_from(list("ab:\\\n\r\u00e9 ")), max_size=8)


class PreEncodedMessageTests(SynchronousTestCase):
    @settings(max_examples=200, deadline=None)
    @given(
        st.sampled_from(["1.0", "1.1", "1.2"]),
        st.sampled_from(["auto", "client", "client-individual"]),
        text.filter(bool),
        text,
        st.dictionaries(text.filter(bool), text, max_size=4),
        st.binary(max_size=8),
        st.booleans(),
    )
    def test_deliver_writes_what_encoding_the_message_frame_writes(
        self,
        version: str,
        ack: str,
        sub_id: str,
        topic: str,
        headers: dict[str, str],
        body: bytes,
        redelivered: bool,
    ) -> None:
        broker = make_broker()
        client = Client(broker)
        client.connect(version=version)
        destination = "/topic/" + topic
        peer = client.protocol.peer
        assert peer is not None
        subscription = broker.realm.subscribe(peer, sub_id, destination, AckMode(ack))
        message = Message("m-7", destination, headers, body, 100, redelivered)
        for _ in range(2):  # the second time from the caches
            client.transport.clear()
            written = client.protocol.deliver(subscription, message)
            fast = client.transport.value()
            client.transport.clear()
            client.protocol._write(_message_frame(subscription, message))
            self.assertEqual(fast, client.transport.value())
            self.assertEqual(written, len(fast))

    @settings(max_examples=100, deadline=None)
    @given(st.sampled_from(["1.0", "1.1", "1.2"]), text)
    def test_receipt_is_what_encoding_the_receipt_frame_writes(self, version: str, receipt: str) -> None:
        broker = make_broker()
        client = Client(broker)
        client.connect(version=version)
        client.transport.clear()
        client.protocol._receipt(receipt)
        fast = client.transport.value()
        client.transport.clear()
        client.protocol._write(Frame("RECEIPT", {"receipt-id": receipt}))
        self.assertEqual(fast, client.transport.value())
