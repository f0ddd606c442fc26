"""Client side: local training, the fl-sim ClientApp and ``compression_mod``."""

from .mods import compression_mod

__all__ = ["compression_mod", "make_client_app"]


def __getattr__(name):
    if name == "make_client_app":
        from .app import make_client_app

        return make_client_app
    raise AttributeError(name)
