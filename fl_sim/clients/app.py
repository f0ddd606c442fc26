"""The fl-sim ClientApp: local training on the virtual client named in the message.

A train message carries the global model and a ConfigRecord with the client id (``keys.CID``, the
data partition) and the round; the reply carries the locally trained model and its metrics, like any
Flower PyTorch ClientApp. Compression is not done here: ``compression_mod`` wraps this app and turns
the reply into an encoded update, exactly as it would wrap a user's own ClientApp.

Vectorized backend (``simulation.backend: vectorized``, fl_sim.engine.vectorized): the grid trains a round's
clients in one batched call (fl_sim.clients.cohort) and hands each client's result to this app through
:func:`precomputed`; the app then builds the same reply it would have trained for, and its mods
(``compression_mod``: encoding, error-feedback residuals) run on it as on any reply (with the grid's
block-encoded payload for the message where it made one: fl_sim.clients.cohort_encode). A result is used
only for the message it was computed from (same client, round and global-model record), so a mod that
replaced the incoming model gets a freshly trained reply instead.
"""

from __future__ import annotations

from typing import Callable

from flwr.app import Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fl_sim.wire import keys
from fl_sim.config import RunConfig
from fl_sim.wire.records import state_dict_to_arrays
from fl_sim.rng import torch_generator
from fl_sim.clients.daqusgd import daqusgd_reply
from fl_sim.clients.mods import compression_mod, mod_client_id
from fl_sim.clients.secagg_mod import secagg_mod
from fl_sim.clients.precomputed import precomputed, precomputed_key, take
from fl_sim.clients.runtime import ClientRuntime, runtime_for
from fl_sim.clients.training import evaluate_model, train_local

__all__ = ["make_client_app", "FlSimClientApp", "client_id", "train_reply", "evaluate_reply", "precomputed", "precomputed_key"]


def client_id(message: Message, context: Context) -> int:
    """The virtual client id: from the message config, else the node's partition-id (deployment)."""
    config = message.content.get(keys.CONFIG)
    return mod_client_id(config if config is not None else {}, context)


def train_reply(rt: ClientRuntime, message: Message, context: Context) -> Message:
    """Train the received model on this client's data; reply with the model and metrics."""
    cid = client_id(message, context)
    config = message.content[keys.CONFIG]
    rnd = int(config.get(keys.ROUND, 0))
    done = take("train", message, cid)
    if done is not None:  # trained in a batch (fl_sim.engine.vectorized): the same numbers up to float rounding
        state, loss, n = done
        arrays = state_dict_to_arrays(state)
    else:
        x, y = rt.data.client_data(cid)
        model = rt.load_model(message.content[keys.ARRAYS])
        loss = train_local(model, x, y, rt.train_spec(config), local_train_generator(rt.cfg.seed, rnd, cid))
        arrays = state_dict_to_arrays(model.state_dict())
        n = len(y)
    metrics = MetricRecord({keys.NUM_EXAMPLES: int(n), keys.TRAIN_LOSS: float(loss), keys.M_CID: cid})
    content = RecordDict({keys.ARRAYS: arrays, keys.METRICS: metrics})
    return Message(content=content, reply_to=message)


def evaluate_reply(rt: ClientRuntime, message: Message, context: Context) -> Message:
    """Evaluate the received model on this client's data (federated evaluation)."""
    cid = client_id(message, context)
    x, y = rt.data.client_data(cid)
    done = take("evaluate", message, cid)
    loss, acc = done if done is not None else evaluate_model(rt.load_model(message.content[keys.ARRAYS]), x, y)
    metrics = MetricRecord({keys.NUM_EXAMPLES: int(len(y)), "eval-loss": loss, "eval-acc": acc, keys.M_CID: cid})
    return Message(content=RecordDict({keys.METRICS: metrics}), reply_to=message)


def local_train_generator(seed: int, rnd: int, cid: int):
    """The generator of a client's batch order in a round: (run seed, round, "local-train", cid), never the
    cohort or the process, so every backend gives a client the same batches."""
    return torch_generator(seed, rnd, "local-train", cid)


class FlSimClientApp(ClientApp):
    """fl-sim's ClientApp. It pickles as its recipe, ``make_client_app(cfg_source, mods=mods)``.

    Flower's Ray backend sends the ClientApp (a closure returning it) with *every* message
    (``a.run.remote(app_fn, message, cid, context)``); by value, cloudpickle serializes the app's
    handler closures and their globals each time: 1.1 ms of driver CPU per message for 4.4 KB. The
    recipe is the config (a dataclass, 0.1 ms) and the mods (module functions pickle by reference);
    the actor rebuilds the same app from it (the process's runtime cache keeps data and model).
    """

    def __reduce__(self):
        return (_rebuild_client_app, self._fl_sim_recipe)


def _rebuild_client_app(cfg_source, mods) -> ClientApp:
    return make_client_app(cfg_source, mods=mods)


def make_client_app(cfg_source: RunConfig | Callable[[Context], RunConfig], *, mods=None) -> ClientApp:
    """A ClientApp for a config (or a function that builds it from the node's Context).

    ``mods`` defaults to ``[compression_mod]`` (``[secagg_mod, compression_mod]`` with ``secagg.enabled``
    or a config built per node); it passes plain models through when the strategy
    asks for no codec. The app carries ``fl_sim_runtime`` (Context -> ClientRuntime): the vectorized
    grid recognizes fl-sim's own app by it and trains its clients in batches; and ``fl_sim_mods`` (its
    mods): with exactly ``(compression_mod,)`` the grid also encodes a chunk's updates as one block.
    Pickled, the app is its recipe (:class:`FlSimClientApp`), so handlers added to it afterwards do not travel.
    """
    if mods is None:  # SecAgg+'s mod sits outside compression_mod, to mask the encoded payload
        secure = callable(cfg_source) or cfg_source.secagg.enabled
        mods = [secagg_mod, compression_mod] if secure else [compression_mod]
    mods = list(mods)
    app = FlSimClientApp(mods=mods)
    app._fl_sim_recipe = (cfg_source, mods)  # type: ignore[attr-defined]
    # the vectorized grid encodes a chunk's replies as one block only when compression_mod is the app's
    # one mod (fl_sim.clients.cohort_encode); a user's own mods get every reply through them one by one
    app.fl_sim_mods = tuple(mods)  # type: ignore[attr-defined]

    def _rt(context: Context) -> ClientRuntime:
        cfg = cfg_source(context) if callable(cfg_source) else cfg_source
        return runtime_for(cfg)

    app.fl_sim_runtime = _rt  # type: ignore[attr-defined]

    @app.train()
    def _train(message: Message, context: Context) -> Message:
        config = message.content.get(keys.CONFIG)
        if config is not None and config.get(keys.METHOD) == "daqusgd":
            return daqusgd_reply(_rt(context), message, context, client_id(message, context))
        return train_reply(_rt(context), message, context)

    @app.evaluate()
    def _evaluate(message: Message, context: Context) -> Message:
        return evaluate_reply(_rt(context), message, context)

    return app
