"""Wire keys shared by strategies (server) and client apps/mods: one naming style, one place.

ConfigRecord keys sent with a train message, and the record names of a reply. A strategy and its
client piece agree only through these constants.
"""

# RecordDict entries
ARRAYS = "arrays"  # the global model (down) / the trained model or the payload (up)
CONFIG = "config"
METRICS = "metrics"
PAYLOAD_META = "fl-sim.payload"  # ConfigRecord describing an encoded payload in ARRAYS
REPLY_META = "fl-sim.reply"  # ConfigRecord of every train reply (compression_mod): the round it answers

# ConfigRecord keys (server -> client)
ROUND = "server-round"
CID = "fl-sim.cid"  # virtual client id (partition) this message is for
SEED = "fl-sim.seed"  # the round's common seed (codec randomness is rebuilt from it and the client id)
CODEC = "fl-sim.codec"  # codec registry name; absent = send the model uncompressed
CODEC_PARAMS = "fl-sim.codec-params"  # JSON of the codec parameters
SEED_MODE = "fl-sim.seed-mode"  # "per_client" (own randomness per client id) | "shared" (old: same for all); protocol.py
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

# DaQuSGD (server -> client; fl_sim.strategies.daqusgd and fl_sim.clients.daqusgd)
METHOD = "fl-sim.method"  # "daqusgd": the client runs DaQuSGD's selection instead of local training
DAQU_THRESHOLD = "fl-sim.daqusgd-threshold"  # loss threshold l_th
DAQU_BITS = "fl-sim.daqusgd-bits"  # bits per feature of the per-feature DataQ (§VI)
DAQU_QUANTIZER = "fl-sim.daqusgd-quantizer"  # "per_feature" (§VI) | "exact" (Algorithm 2 + Remark 1)
DAQU_LEVELS = "fl-sim.daqusgd-levels"  # m of the exact DataQ
DAQU_GRADCORRQ = "fl-sim.daqusgd-gradcorrq"  # bool: send GradCorrQ's bit per sample (Algorithm 3)
DAQU_CZ = "fl-sim.daqusgd-cz"  # C_z of eq. (4) for GradCorrQ's bound (eq. 8)

# Payload meta keys (ConfigRecord PAYLOAD_META)
P_CODEC = "codec"
P_DIM = "dim"
P_BITS = "bits"
P_META = "meta"  # JSON of Payload.meta
P_CID = "cid"  # the client id the payload was encoded for (its per-client seed)

# Reply meta keys (ConfigRecord REPLY_META, client -> server)
R_ROUND = "round"  # the ROUND of the train message the reply answers (a stale or replayed reply differs)

# MetricRecord keys (client -> server)
NUM_EXAMPLES = "num-examples"
TRAIN_LOSS = "train-loss"
UPLINK_BITS = "uplink-bits"
M_CID = "cid"
UPDATE_NORM = "update-norm"  # ‖z‖ of the encoded update (answer to REPORT_NORM)
DAQU_LOSS_SUM = "sent-loss-sum"  # DaQuSGD: sum of the sent samples' losses (threshold rule)
DAQU_SENT = "sent-samples"  # DaQuSGD: samples sent
DAQU_CONSIDERED = "candidates"  # DaQuSGD: samples considered (the N of Theorem 3's 1/N)
DAQU_CLIPPED = "gradcorrq-clipped"  # DaQuSGD: samples whose GradCorrQ probability was clamped (biased)

# Sparse broadcast of the global model (fl_sim.strategies.broadcast, fl_sim.clients.broadcast)
SPARSE_MODEL = "fl-sim.sparse-model"  # ArrayRecord (down): <name>.idx, <name>.val of the changed entries
MODEL_VERSION = "fl-sim.model-version"  # config (down): the model's version (its round); reply record: held
MODEL_BASE = "fl-sim.model-base"  # config (down): the version the sparse record changes
MODEL_HELD = "fl-sim.model-held"  # ConfigRecord (up): MODEL_VERSION of the model the node now holds
SPARSE_IDX, SPARSE_VAL = ".idx", ".val"  # suffixes of an array's indices / values in SPARSE_MODEL
