"""ServerApp: CompressedFedAvg around Flower's FedAvg; per reply, the bytes Flower transferred.

For every train reply it records the bytes of the Flower objects the reply was sent as (the Message, its
RecordDict, records, Arrays and array chunks, each deflated with its object header: what the SuperNode
pushes to the SuperLink and the ServerApp pulls), the data bytes of the payload arrays, the codec's count
(the payload ConfigRecord's ``bits``) and the server's own count (``server.uplink_bits``).
"""

import json
from pathlib import Path

import numpy as np
from flwr.app import Array, ArrayRecord, Context
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg
from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects

from fl_sim.wire import keys
from fl_sim.runs.results import atomic_write
from fl_sim.wire.records import read_array
from fl_sim.strategies import CompressedFedAvg

app = ServerApp()
SIZES = (60_000, 40_000)  # d = 100,000 in two tensors


class Measured(CompressedFedAvg):
    """CompressedFedAvg that writes down each reply's size before aggregating."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.rows: list[dict] = []

    def aggregate_train(self, server_round, replies):
        replies = list(replies)
        for msg in replies:
            if msg.has_error():
                continue
            objects = get_all_nested_objects(msg)
            arrays = msg.content[keys.ARRAYS]
            self.rows.append({
                "round": server_round,
                "node": msg.metadata.src_node_id,
                "message_bytes": sum(len(o.deflate()) for o in objects.values()),
                "objects": len(objects),
                "payload_bytes": sum(read_array(a, k).nbytes for k, a in arrays.items()),
                "counted_bits": int(msg.content[keys.PAYLOAD_META][keys.P_BITS]),
            })
        out = super().aggregate_train(server_round, replies)
        server_bits = self.last_metrics.get("uplink_bits")
        for row in self.rows:
            if row["round"] == server_round:
                row["server_round_uplink_bits"] = server_bits
        return out


@app.main()
def main(grid: Grid, context: Context) -> None:
    codec = str(context.run_config["codec"])
    params = json.loads(str(context.run_config["codec-params"]))
    strategy = Measured(FedAvg(fraction_train=1.0, fraction_evaluate=0.0, min_available_nodes=2, min_train_nodes=2),
                        codec=codec, codec_params=params)
    initial = ArrayRecord({f"t{i}": Array(np.zeros(n, dtype=np.float32)) for i, n in enumerate(SIZES)})
    strategy.start(grid=grid, initial_arrays=initial, num_rounds=int(context.run_config["num-server-rounds"]))
    out = Path(str(context.run_config["out"]))
    atomic_write(out, json.dumps({"codec": codec, "params": params, "rows": strategy.rows}, indent=2))
    print(f"[wireapp] {codec}: {len(strategy.rows)} replies measured -> {out}", flush=True)
