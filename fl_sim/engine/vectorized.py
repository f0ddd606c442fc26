"""``simulation.backend: vectorized``: a Grid that trains a round's clients in batched calls.

The strategy and Flower's message flow stay as they are: the strategy's ``configure_train`` messages go
in, one reply message per client comes out, the same reply the inline backend (fl_sim.engine.inline
InMemoryGrid) returns, up to float rounding. What changes is the transport's inside:

1. the train (and evaluate) messages addressed to fl-sim's built-in ClientApp (recognized by its
   ``fl_sim_runtime`` attribute) are grouped by local hyperparameters (``LocalTrainSpec``: one batch
   size, learning rate, ... per batched call) and split into chunks of at most ``chunk`` clients
   (``simulation.cohort_chunk``, or automatic from ``simulation.cohort_memory_mb``, the parameter count and
   one batch's activations: fl_sim.clients.cohort.auto_chunk);
2. each chunk is trained in one batched call (fl_sim.clients.cohort.train_cohort), on the CPU with
   ``simulation.cohort_threads`` torch threads (0 = automatic, fl_sim.clients.cohort_threads: one thread
   unless the machine's cores are idle, then one per core while that is faster; a cohort's products split
   across free cores, one client's do not, so the per-client paths keep one thread) or on CUDA
   (``simulation.device``);
3. where the app is fl-sim's own with ``compression_mod`` as its one mod and the round names a codec, the
   chunk's updates are encoded as one block too (fl_sim.clients.cohort_encode: Δ for the chunk, error
   feedback residuals read and written as one block, the codec's ``encode_batch``);
4. every message of the chunk then goes through the ClientApp as usual (its mods included), and the app
   builds its reply from the batched result instead of training, ``compression_mod`` its records from the
   block-encoded payload instead of encoding (fl_sim.clients.precomputed).

Messages the batched path cannot serve go through the ClientApp one by one, as inline: a user's own
ClientApp (one notice), DaQuSGD rounds (the client selects and quantizes samples itself), models with
buffers or dropout (one notice). Replies come back in message order.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections import Counter, defaultdict
from collections.abc import Iterable, Iterator

import torch
from flwr.app import Message, MessageType

from fl_sim.wire import keys
from fl_sim.clients.broadcast import receive_model
from fl_sim.clients.app import client_id, local_train_generator, precomputed, precomputed_key
from fl_sim.clients.cohort import CohortClient, auto_chunk, evaluate_cohort, train_cohort, vectorizable
from fl_sim.clients import cohort_encode
from fl_sim.clients.cohort_threads import ThreadChooser
from fl_sim.clients.daqusgd import METHOD
from fl_sim.engine.inline import InMemoryGrid

__all__ = ["VectorizedGrid", "resolve_device", "DEVICES", "intra_op_threads", "cpu_cores"]

log = logging.getLogger("fl_sim")

DEVICES = ("cpu", "cuda", "auto")


def resolve_device(name: str) -> torch.device:
    """``simulation.device``: cpu; cuda (an error without a GPU); auto (cuda when present, else cpu)."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("simulation.device=cuda but torch sees no CUDA device; use simulation.device=auto or cpu")
    if name not in DEVICES:
        raise ValueError(f"simulation.device={name!r}: use cpu, cuda or auto")
    return torch.device(name)


def cpu_cores() -> int:
    """Cores this process may run on (its CPU affinity; os.cpu_count where affinity is not exposed)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


def cpu_model() -> str:
    """The CPU's model name (/proc/cpuinfo's first ``model name``; platform.processor() elsewhere, "?" if none)."""
    import platform
    from pathlib import Path

    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "?"


@contextlib.contextmanager
def intra_op_threads(n: int) -> Iterator[None]:
    """torch's intra-op thread count set to ``n`` (0 = :func:`cpu_cores`) inside, the previous one restored."""
    before = torch.get_num_threads()
    want = n or cpu_cores()
    if want != before:
        torch.set_num_threads(want)
    try:
        yield
    finally:
        if torch.get_num_threads() != before:
            torch.set_num_threads(before)


class VectorizedGrid(InMemoryGrid):
    """An InMemoryGrid whose built-in-app clients train in batched chunks (module docstring).

    ``chunk`` (clients per batched call; 0 = automatic), ``memory_mb`` (the automatic chunk's budget),
    ``device`` and ``threads`` (torch intra-op threads of a batched CPU call; 0 = automatic,
    fl_sim.clients.cohort_threads) default to the
    run config's ``simulation`` keys when the app is fl-sim's own.
    ``batch_encode=False`` leaves every reply's encoding to ``compression_mod`` (the same numbers; tests
    and benchmarks compare the two).
    """

    def __init__(self, client_app, num_nodes: int, *, chunk: int | None = None, memory_mb: float | None = None,
                 device: str | None = None, threads: int | None = None, batch_encode: bool = True,
                 **kwargs) -> None:
        super().__init__(client_app, num_nodes, **kwargs)
        self.batch_encode = bool(batch_encode)
        self._repeated: set[int] = set()  # client ids with more than one train message in this send
        self.last_encoded = 0  # replies the last call encoded as blocks (tests, benchmarks)
        self.chunk = chunk
        self.memory_mb = memory_mb
        self.device_name = device
        self.threads = threads
        self._noticed: set[str] = set()
        self._why: dict[int, str] = {}  # runtime id -> why its model is not vectorized ('' = it is)
        self.last_chunks: list[int] = []  # chunk sizes of the last call that had messages (tests, benchmarks)
        # torch threads of each batched CPU call (fl_sim.clients.cohort_threads: one unless the cores are idle);
        # built here so that its first look at the machine's load covers the run's set-up
        self.thread_chooser = ThreadChooser(fixed=threads or 0, cores=cpu_cores())

    def _notice(self, why: str) -> None:
        if why not in self._noticed:
            self._noticed.add(why)
            log.warning("simulation.backend=vectorized: %s; those clients train one by one (the inline path)", why)

    def _rebuild_sparse_models(self) -> None:
        """Rebuild sparse model broadcasts (fl_sim.clients.broadcast) before batching, as the nodes'
        compression_mod would, so their clients train in the batch like the others (the per-message path
        rounds differently). A message that cannot be rebuilt is left to the mod, whose error is the reply."""
        for msg in self.sent:
            node = msg.metadata.dst_node_id
            if (msg.metadata.message_type == MessageType.TRAIN and keys.SPARSE_MODEL in msg.content
                    and node in self.contexts and node not in self.drop_nodes and node not in self.fail_nodes):
                with contextlib.suppress(ValueError):
                    receive_model(msg, self.contexts[node])

    # ------------------------------------------------------------------ batching
    def _batchable(self, msg: Message, runtime_of) -> bool:
        node = msg.metadata.dst_node_id
        if node in self.drop_nodes or node in self.fail_nodes or node not in self.contexts:
            return False
        if msg.metadata.message_type not in (MessageType.TRAIN, MessageType.EVALUATE):
            return False
        config = msg.content.get(keys.CONFIG)
        if msg.metadata.message_type == MessageType.TRAIN and (config is None or config.get(METHOD) == "daqusgd"):
            return False
        return keys.ARRAYS in msg.content

    def _settings(self, rt) -> tuple[int, float, torch.device]:
        sim = rt.cfg.simulation
        chunk = self.chunk if self.chunk is not None else int(getattr(sim, "cohort_chunk", 0))
        memory = self.memory_mb if self.memory_mb is not None else float(getattr(sim, "cohort_memory_mb", 1024.0))
        device = resolve_device(self.device_name or str(getattr(sim, "device", "cpu")))
        return chunk, memory, device

    def _threads(self, rt) -> int:
        return int(self.threads if self.threads is not None else getattr(rt.cfg.simulation, "cohort_threads", 0))

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        self.sent = list(messages)
        self.last_encoded = 0
        if not self.sent:
            return []
        self.last_chunks = []
        runtime_of = getattr(self.client_app, "fl_sim_runtime", None)
        if runtime_of is None:
            self._notice("the ClientApp is not fl-sim's built-in one")
            return [r for r in map(self.deliver, self.sent) if r is not None]
        self._rebuild_sparse_models()
        # group: (message type, runtime, train spec) -> messages, in message order
        groups: dict[tuple, list[int]] = defaultdict(list)
        runtimes = {}
        for i, msg in enumerate(self.sent):
            if not self._batchable(msg, runtime_of):
                continue
            rt = runtime_of(self.contexts[msg.metadata.dst_node_id])
            if id(rt) not in self._why:
                self._why[id(rt)] = vectorizable(rt.model)
            why = self._why[id(rt)]
            if why:
                self._notice(why)
                continue
            runtimes[id(rt)] = rt
            if msg.metadata.message_type == MessageType.TRAIN:
                key = ("train", id(rt), rt.train_spec(msg.content[keys.CONFIG]))
            else:
                key = ("evaluate", id(rt), None)
            groups[key].append(i)
        trains = Counter(client_id(m, self.contexts[m.metadata.dst_node_id]) for m in self.sent
                         if m.metadata.message_type == MessageType.TRAIN and m.metadata.dst_node_id in self.contexts)
        self._repeated = {cid for cid, n in trains.items() if n > 1}
        chunk_of: dict[int, tuple] = {}  # message index -> (group key, chunk number)
        chunks: dict[tuple, list[int]] = {}
        for key, idx in groups.items():
            rt = runtimes[key[1]]
            size, memory, _ = self._settings(rt)
            if size <= 0:
                x0, _y0 = rt.data.client_data(client_id(self.sent[idx[0]], self.contexts[self.sent[idx[0]].metadata.dst_node_id]))
                sample = x0[0] if len(x0) else torch.zeros(rt.data.input_shape)
                batch = key[2].batch_size if key[2] is not None else 1024
                size = auto_chunk(rt.model, sample, batch, int(memory * 2**20))
            for n, start in enumerate(range(0, len(idx), size)):
                chunks[(key, n)] = idx[start : start + size]
                self.last_chunks.append(len(chunks[(key, n)]))
                for i in chunks[(key, n)]:
                    chunk_of[i] = (key, n)
        results: dict[tuple, object] = {}
        done: set[tuple] = set()
        replies = []
        with precomputed(results):
            for i, msg in enumerate(self.sent):
                c = chunk_of.get(i)
                if c is not None and c not in done:
                    results.clear()  # the previous chunk's results were all used: keep one chunk in memory
                    rt = runtimes[c[0][1]]
                    self.thread_chooser.fixed = self._threads(rt)
                    threads = self.thread_chooser.threads(c[0])
                    try:
                        t0 = time.perf_counter()
                        with intra_op_threads(threads):
                            results.update(self._run_chunk(c[0], [self.sent[j] for j in chunks[c]], rt))
                        self.thread_chooser.record(c[0], threads, time.perf_counter() - t0, len(chunks[c]))
                    except Exception as exc:  # noqa: BLE001 - its clients go the inline way (a crash = error reply)
                        log.warning("simulation.backend=vectorized: a batched chunk failed (%s: %s); its %d clients "
                                    "train one by one", type(exc).__name__, exc, len(chunks[c]))
                    done.add(c)
                reply = self.deliver(msg)
                if reply is not None:
                    replies.append(reply)
            results.clear()
        return replies

    def _run_chunk(self, key: tuple, msgs: list[Message], rt) -> dict[tuple, object]:
        kind, _, spec = key
        _, _, device = self._settings(rt)
        names = [k for k, _ in rt.model.named_parameters()]
        converted: dict[int, dict[str, torch.Tensor]] = {}  # one conversion per distinct global-model record
        clients, cids = [], []
        for msg in msgs:
            cid = client_id(msg, self.contexts[msg.metadata.dst_node_id])
            record = msg.content[keys.ARRAYS]
            if id(record) not in converted:
                state = {k: torch.from_numpy(a.numpy().copy()) for k, a in record.items()}
                if list(state) != names:
                    raise ValueError(f"the global model record has arrays {list(state)[:3]}..., the client model "
                                     f"{names[:3]}...: not the run's model")
                converted[id(record)] = state
            x, y = rt.data.client_data(cid)
            rnd = int(msg.content[keys.CONFIG].get(keys.ROUND, 0)) if keys.CONFIG in msg.content else 0
            gen = local_train_generator(rt.cfg.seed, rnd, cid) if kind == "train" else None
            clients.append(CohortClient(x, y, converted[id(record)], gen))
            cids.append(cid)
        out: dict[tuple, object] = {}
        if kind == "train":
            trained, loss = train_cohort(rt.model, clients, spec, device=device)
            for j, (msg, cid) in enumerate(zip(msgs, cids)):
                out[precomputed_key("train", msg, cid)] = (
                    {k: v[j] for k, v in trained.items()}, float(loss[j]), len(clients[j].y))
            if self.batch_encode and cohort_encode.applies(self.client_app):
                out.update(self._encode_chunk(msgs, cids, trained, names))
        else:
            loss, acc = evaluate_cohort(rt.model, clients, device=device)
            for j, (msg, cid) in enumerate(zip(msgs, cids)):
                out[precomputed_key("evaluate", msg, cid)] = (float(loss[j]), float(acc[j]))
        return out

    def _encode_chunk(self, msgs: list[Message], cids: list[int], trained: dict[str, torch.Tensor],
                      names: list[str]) -> dict[tuple, object]:
        """The chunk's updates encoded as one block (fl_sim.clients.cohort_encode); {} when that fails (a
        notice; compression_mod then encodes each reply itself)."""
        local = torch.cat([trained[k].reshape(len(msgs), -1) for k in names], dim=1)
        contexts = [self.contexts[m.metadata.dst_node_id] for m in msgs]
        try:
            encoded = cohort_encode.encode_cohort(msgs, contexts, cids, local, skip=self._repeated)
        except Exception as exc:  # noqa: BLE001 - the mod encodes each reply instead
            log.warning("simulation.backend=vectorized: batched encoding failed (%s: %s); compression_mod encodes "
                        "the %d replies one by one", type(exc).__name__, exc, len(msgs))
            return {}
        self.last_encoded += len(encoded)
        return encoded
