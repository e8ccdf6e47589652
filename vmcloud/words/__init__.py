"""The vocabulary of the guest channel (seed 001): one class per word, an interpreter, the channel.

``grammar`` (where a word sits in a message), ``contexts`` (what each side lets a word do), the
words by topic (``presence``, ``commands``, ``files``, ``browser``), ``interpreter`` (routing and
AINT_A_WORD), ``vocabulary`` (who hears what), ``channel`` (the controller's GuestChannel) and
``destinations`` (the STOMP names everyone shares).
"""
