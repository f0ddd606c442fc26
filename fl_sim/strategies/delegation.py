"""What a wrapped strategy's class adds survives the wrapper: its own ``start`` and its own attributes.

A user's strategy often is more than its round methods. Flower's advanced-pytorch example subclasses
FedAvg with a ``start`` of its own (the round loop with W&B logging, a results.json per round and a
checkpoint of the best model) and methods the ServerApp calls before the run
(``set_save_path_and_run_dir``). Wrapped by a method, ``QCS(CustomFedAvg(...))``:

* ``wrapper.start(...)`` runs the inner's own ``start`` when its class overrides Flower's
  ``Strategy.start``: the inner's loop drives the rounds (so its logging, result files and checkpoints
  run), while the round methods it calls on ``self`` (``configure_train``, ``aggregate_train``,
  ``configure_evaluate``, ``aggregate_evaluate``, ``summary``) are the wrapper's, which compress and
  then hand the decoded replies to the inner's own round methods as usual;
* ``wrapper.name`` finds what the wrapper lacks on the inner (``wrapper.set_save_path_and_run_dir(...)``
  calls the inner's method; ``wrapper.best_acc_so_far`` reads the inner's attribute).

How the inner's loop is driven: a *driver*, an instance of a subclass of the inner's class created for
the call, whose round methods forward to the wrapper and whose ``__dict__`` *is* the inner's (one
dictionary, not a copy): whatever the inner's ``start`` reads or writes on ``self`` (``self.save_path``,
``self.best_acc_so_far``, ``super().start(...)``) is the inner's own state, and ``isinstance`` checks in
its code still hold.
"""

from __future__ import annotations

from typing import Any

from flwr.serverapp.strategy import Strategy

__all__ = ["ROUND_METHODS", "overrides_start", "driver_for"]

# What Flower's loop calls on the strategy each round: the wrapper's versions of these drive the inner's loop.
ROUND_METHODS = ("configure_train", "aggregate_train", "configure_evaluate", "aggregate_evaluate", "summary")


def overrides_start(strategy: Strategy) -> bool:
    """Whether ``strategy``'s class has a ``start`` of its own (not Flower's ``Strategy.start``)."""
    return getattr(type(strategy), "start", Strategy.start) is not Strategy.start


def _forward(wrapper: Strategy, name: str):
    def method(self, *args: Any, **kwargs: Any) -> Any:  # noqa: ARG001 - self is the driver
        return getattr(wrapper, name)(*args, **kwargs)

    method.__name__ = name
    return method


def driver_for(inner: Strategy, wrapper: Strategy) -> Strategy:
    """An object that *is* ``inner`` (its class's methods, the inner's own ``__dict__``) except that its
    round methods (:data:`ROUND_METHODS`) are ``wrapper``'s: ``driver_for(inner, wrapper).start(...)``
    runs the inner's loop around the wrapper's rounds.

    The driver's class is named like the inner's (Flower's "Starting CustomFedAvg strategy" line and the
    user's own logs read as without the wrapper).
    """
    cls = type(inner)
    namespace = {name: _forward(wrapper, name) for name in ROUND_METHODS}
    namespace.update(__module__=cls.__module__, __qualname__=cls.__qualname__,
                     __doc__=f"{cls.__name__} whose rounds are {type(wrapper).__name__}'s (fl-sim).")
    driver_cls = type(cls)(cls.__name__, (cls,), namespace)  # type(cls): the metaclass (ABCMeta for Strategy)
    driver = object.__new__(driver_cls)
    driver.__dict__ = inner.__dict__  # the same dictionary: state written by the inner's start is the inner's
    return driver
