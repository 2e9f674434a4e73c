"""A free TCP port for a torchrun rendezvous: fixed ports collide when two test runs share a machine."""
import socket


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
