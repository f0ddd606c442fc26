"""ClientApp: train the received model locally and return it (a standard Flower PyTorch client)."""

from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fl_sim.clients import compression_mod  # added for fl-sim

from .task import load_partition, make_model, test, train

app = ClientApp(mods=[compression_mod])  # was: ClientApp()


@app.train()
def train_fn(msg: Message, context: Context) -> Message:
    model = make_model()
    model.load_state_dict(msg.content["arrays"].to_torch_state_dict())
    x, y = load_partition(context.node_config["partition-id"], context.node_config["num-partitions"])
    loss = train(model, x, y, lr=float(context.run_config["lr"]))
    content = RecordDict(
        {"arrays": ArrayRecord(model.state_dict()), "metrics": MetricRecord({"train_loss": loss, "num-examples": len(y)})}
    )
    return Message(content=content, reply_to=msg)


@app.evaluate()
def evaluate_fn(msg: Message, context: Context) -> Message:
    model = make_model()
    model.load_state_dict(msg.content["arrays"].to_torch_state_dict())
    x, y = load_partition(context.node_config["partition-id"], context.node_config["num-partitions"])
    loss, acc = test(model, x, y)
    return Message(RecordDict({"metrics": MetricRecord({"eval_loss": loss, "eval_acc": acc, "num-examples": len(y)})}),
                   reply_to=msg)
