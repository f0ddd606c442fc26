"""Client side: local training, the fl-sim ClientApp and ``compression_mod``.

Layer: the client half of Flower. May import the kernels, ``fl_sim.config`` and ``fl_sim.wire``;
never ``strategies``, ``engine``, ``runs`` or above.
"""

from fl_sim.clients.mods import compression_mod

__all__ = ["compression_mod", "make_client_app"]


def __getattr__(name):
    if name == "make_client_app":
        from fl_sim.clients.app import make_client_app

        return make_client_app
    raise AttributeError(name)
