"""ServerApp: the usual Flower loop; only the strategy line changed."""

from flwr.app import ArrayRecord, Context, MetricRecord
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg

from fl_sim.strategies import FIHTCS  # added for fl-sim

from .task import load_partition, make_model, test

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    model = make_model()
    strategy = FIHTCS(FedAvg(fraction_train=1.0, fraction_evaluate=0.0), compression=4)  # was: FedAvg(...)
    x, y = load_partition(0, 1)

    def central_eval(server_round: int, arrays: ArrayRecord) -> MetricRecord:
        model.load_state_dict(arrays.to_torch_state_dict())
        loss, acc = test(model, x, y)
        print(f"round {server_round}: accuracy {acc:.3f}", flush=True)
        return MetricRecord({"loss": loss, "accuracy": acc})

    strategy.start(
        grid=grid,
        initial_arrays=ArrayRecord(model.state_dict()),
        num_rounds=int(context.run_config["num-server-rounds"]),
        evaluate_fn=central_eval,
    )
