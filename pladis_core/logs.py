"""Log lines that must appear once per process, not once per attention call."""
import logging

_said = set()


def warn_once(message):
    if message not in _said:
        _said.add(message)
        logging.warning(message)
