"""The fl-sim ClientApp: local training on the virtual client named in the message.

A train message carries the global model and a ConfigRecord with the client id (``keys.CID``, the
data partition) and the round; the reply carries the locally trained model and its metrics, like any
Flower PyTorch ClientApp. Compression is not done here: ``compression_mod`` wraps this app and turns
the reply into an encoded update, exactly as it would wrap a user's own ClientApp.
"""

from __future__ import annotations

from typing import Callable

from flwr.app import Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from .. import keys
from ..config import RunConfig
from ..records import state_dict_to_arrays
from ..rng import torch_generator
from .daqusgd import daqusgd_reply
from .mods import compression_mod
from .runtime import ClientRuntime, runtime_for
from .training import evaluate_model, train_local

__all__ = ["make_client_app", "client_id", "train_reply", "evaluate_reply"]


def client_id(message: Message, context: Context) -> int:
    """The virtual client id: from the message config, else the node's partition-id (deployment)."""
    config = message.content.get(keys.CONFIG)
    if config is not None and keys.CID in config:
        return int(config[keys.CID])
    return int(context.node_config.get("partition-id", 0))


def train_reply(rt: ClientRuntime, message: Message, context: Context) -> Message:
    """Train the received model on this client's data; reply with the model and metrics."""
    cid = client_id(message, context)
    config = message.content[keys.CONFIG]
    rnd = int(config.get(keys.ROUND, 0))
    x, y = rt.data.client_data(cid)
    model = rt.load_model(message.content[keys.ARRAYS])
    loss = train_local(model, x, y, rt.train_spec(config), torch_generator(rt.cfg.seed, rnd, "local-train", cid))
    metrics = MetricRecord({keys.NUM_EXAMPLES: int(len(y)), keys.TRAIN_LOSS: float(loss), keys.M_CID: cid})
    content = RecordDict({keys.ARRAYS: state_dict_to_arrays(model.state_dict()), keys.METRICS: metrics})
    return Message(content=content, reply_to=message)


def evaluate_reply(rt: ClientRuntime, message: Message, context: Context) -> Message:
    """Evaluate the received model on this client's data (federated evaluation)."""
    cid = client_id(message, context)
    x, y = rt.data.client_data(cid)
    loss, acc = evaluate_model(rt.load_model(message.content[keys.ARRAYS]), x, y)
    metrics = MetricRecord({keys.NUM_EXAMPLES: int(len(y)), "eval-loss": loss, "eval-acc": acc, keys.M_CID: cid})
    return Message(content=RecordDict({keys.METRICS: metrics}), reply_to=message)


def make_client_app(cfg_source: RunConfig | Callable[[Context], RunConfig], *, mods=None) -> ClientApp:
    """A ClientApp for a config (or a function that builds it from the node's Context).

    ``mods`` defaults to ``[compression_mod]``; it passes plain models through when the strategy
    asks for no codec.
    """
    app = ClientApp(mods=[compression_mod] if mods is None else mods)

    def _rt(context: Context) -> ClientRuntime:
        cfg = cfg_source(context) if callable(cfg_source) else cfg_source
        return runtime_for(cfg)

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
