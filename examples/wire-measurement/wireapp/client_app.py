"""ClientApp: return the received model plus a small Gaussian step (d = 100,000 in two tensors)."""

import numpy as np
from flwr.app import Array, ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fl_sim.clients import compression_mod

app = ClientApp(mods=[compression_mod])


@app.train()
def train_fn(msg: Message, context: Context) -> Message:
    rng = np.random.default_rng([int(context.node_config["partition-id"]), int(msg.content["config"].get("server-round", 0))])
    arrays = msg.content["arrays"]
    stepped = {k: Array((a.numpy() + 0.01 * rng.standard_normal(a.shape)).astype(np.float32)) for k, a in arrays.items()}
    content = RecordDict({"arrays": ArrayRecord(stepped), "metrics": MetricRecord({"num-examples": 10})})
    return Message(content=content, reply_to=msg)
