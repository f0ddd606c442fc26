"""Wire keys shared by strategies (server) and client apps/mods: one naming style, one place.

ConfigRecord keys sent with a train message, and the record names of a reply. A strategy and its
client piece agree only through these constants.
"""

# RecordDict entries
ARRAYS = "arrays"  # the global model (down) / the trained model or the payload (up)
CONFIG = "config"
METRICS = "metrics"
PAYLOAD_META = "fl-sim.payload"  # ConfigRecord describing an encoded payload in ARRAYS

# ConfigRecord keys (server -> client)
ROUND = "server-round"
CID = "fl-sim.cid"  # virtual client id (partition) this message is for
SEED = "fl-sim.seed"  # the round's shared seed (codec randomness is rebuilt from it)
CODEC = "fl-sim.codec"  # codec registry name; absent = send the model uncompressed
CODEC_PARAMS = "fl-sim.codec-params"  # JSON of the codec parameters
SEED_MODE = "fl-sim.seed-mode"  # "shared" (same randomness for all clients) | "per_client"
EF = "fl-sim.ef"  # client error feedback: "none" | "classic" | "weighted"
EF_BETA = "fl-sim.ef-beta"
EF_DTYPE = "fl-sim.ef-dtype"  # "float32" | "float16" residual storage
EF_STORE = "fl-sim.ef-store"  # where residuals live: "context" (default) | "disk" (fl_sim.clients.residuals)
EF_STORE_DIR = "fl-sim.ef-store-dir"  # disk store: its directory (shared by the processes of a run)
EF_STORE_ID = "fl-sim.ef-store-id"  # disk store: the run's store id (a recreated store is not reused)
EF_STORE_BUDGET = "fl-sim.ef-store-budget"  # disk store: bytes of rows a process may cache in memory
LOCAL_EPOCHS = "fl-sim.local-epochs"
LOCAL_STEPS = "fl-sim.local-steps"
LR = "fl-sim.lr"
BATCH_SIZE = "fl-sim.batch-size"
REPORT_NORM = "fl-sim.report-norm"  # ask the client to report ‖z‖ of what it encoded (RLC power control)
ARRAYRECORD_KEY = "fl-sim.arrayrecord-key"  # the strategy's arrayrecord_key: which ArrayRecord holds the model
METHOD = "fl-sim.method"  # a method whose client side is not "train and send Δ" (e.g. "daqusgd")
DAQUSGD_THRESHOLD = "fl-sim.daqusgd-threshold"  # ℓ_th of DaQuSGD's sample selection
DAQUSGD_BITS = "fl-sim.daqusgd-bits"  # DataQ bits per feature
DAQUSGD_GRADCORRQ = "fl-sim.daqusgd-gradcorrq"

# Payload meta keys (ConfigRecord PAYLOAD_META)
P_CODEC = "codec"
P_DIM = "dim"
P_BITS = "bits"
P_META = "meta"  # JSON of Payload.meta
P_CID = "cid"  # the client id the payload was encoded for (its per-client seed)

# MetricRecord keys (client -> server)
NUM_EXAMPLES = "num-examples"
TRAIN_LOSS = "train-loss"
UPLINK_BITS = "uplink-bits"
M_CID = "cid"
UPDATE_NORM = "update-norm"  # ‖z‖ of the encoded update (answer to REPORT_NORM)
DAQUSGD_LOSS_SUM = "sent-loss-sum"  # DaQuSGD: Σ ℓ(W, Z) over the samples a node sent
DAQUSGD_SENT = "sent-samples"  # DaQuSGD: samples a node sent
