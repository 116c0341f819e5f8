"""What the tests that start gloo process groups share."""

import socket


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now, for a test's ``init_process_group``."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
