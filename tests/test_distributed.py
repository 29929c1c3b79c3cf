"""Training under torchrun, checkpoints, node failures and elastic resume.

Three layers: the pure rest plan (``plan.rest_stream`` / ``plan.rest_plan``) over grids of old
world sizes x new world sizes x workers x how far the epoch got; ``StreamingDataset`` states
merged from simulated ranks (``rank=`` / ``world_size=``) and resumed in-process; and real
``torchrun`` jobs (gloo, CPU, 127.0.0.1 only) over shards on local disk and on a local S3 server,
killed part-way through an epoch and restarted from their checkpoint, with the same and with
fewer ranks.
"""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

import shardkit
from shardkit import StreamingDataset, make_loader
from shardkit.plan import epoch_plan, remaining_spans, rest_plan, rest_stream

from _helpers_read import all_keys, duplicates, keys_of, packed_raw

# --------------------------------------------------------------------------- pure: rest plans

SIZES = {"uneven": [5, 9, 1, 13, 7, 2, 11, 3, 8, 4, 6, 12], "one": [37], "tiny": [2, 0, 3]}
FRACTIONS = (0.0, 0.3, 0.7, 1.0)


def _ids(sizes, spans) -> np.ndarray:
    offsets = np.concatenate(([0], np.cumsum(sizes)))
    parts = [offsets[s.shard] + np.arange(s.start, s.stop) for s in spans]
    return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)


def _old_run(sizes, world, workers, fraction, **kw):
    """Old plans, consumed counts (a fraction of each worker's, varied), emitted ids, rest set."""
    plans = [[epoch_plan(sizes, rank=r, world_size=world, worker=w, num_workers=workers, **kw)
              for w in range(workers)] for r in range(world)]
    consumed = [[round(fraction * p.num_samples * (1 - 0.2 * ((r + w) % 2)))
                 for w, p in enumerate(row)] for r, row in enumerate(plans)]
    emitted, rest_by_spans, planned = [], set(), set()
    for row, counts in zip(plans, consumed):
        for p, c in zip(row, counts):
            ids = _ids(sizes, p.spans)
            planned |= set(ids.tolist())
            emitted += ids[p.order[:c]].tolist()
            rest_by_spans |= set(_ids(sizes, remaining_spans(p, c)).tolist())
    rest = planned - set(emitted)
    assert rest_by_spans - set(emitted) == rest  # remaining_spans agrees (pad: repeats aside)
    return consumed, emitted, rest


def _new_run(sizes, stream, world, workers, level=1, **kw):
    return [[rest_plan(sizes, stream, rank=r, world_size=world, worker=w, num_workers=workers,
                       level=level, **kw) for w in range(workers)] for r in range(world)]


def _check_rest(sizes, plans, rest, remainder, batch_size):
    ids = np.concatenate([_ids(sizes, p.spans) for row in plans for p in row])
    world, total = len(plans), len(rest)
    per_rank = total // world if remainder == "drop" else -(-total // world)
    for row in plans:
        assert sum(p.num_samples for p in row) == per_rank
        if batch_size:
            assert sum(len(p.batch_sizes) for p in row) == -(-per_rank // batch_size)
        for p in row:
            assert np.array_equal(np.sort(p.order), np.arange(p.num_samples))
    counts = Counter(ids.tolist())
    assert set(counts) <= rest
    if remainder == "drop":
        assert max(counts.values(), default=1) == 1
        assert len(rest - set(counts)) == total % world
    else:
        assert set(counts) == rest
        assert sum(counts.values()) - total == per_rank * world - total


@pytest.mark.parametrize("layout", sorted(SIZES))
@pytest.mark.parametrize("remainder", ["drop", "pad"])
@pytest.mark.parametrize("batch_size", [None, 3])
def test_rest_plan_reads_every_remaining_sample_once(layout, remainder, batch_size):
    sizes = SIZES[layout]
    kw = dict(seed=5, epoch=2, block_size=4, shuffle_buffer=6, remainder=remainder,
              batch_size=batch_size)
    for old_world, new_world, old_w, new_w, fraction in itertools.product(
            (1, 2, 3), (1, 2, 3, 4), (1, 2), (1, 2), FRACTIONS):
        consumed, _, rest = _old_run(sizes, old_world, old_w, fraction, **kw)
        stream = rest_stream(sizes, consumed, world_size=old_world, num_workers=old_w, **{
            k: v for k, v in kw.items() if k != "block_size"})
        assert int((stream[:, 1] - stream[:, 0]).sum()) == len(rest)
        plans = _new_run(sizes, stream, new_world, new_w, **kw)
        _check_rest(sizes, plans, rest, remainder, batch_size)


def test_rest_of_a_rest_and_changed_batch_size():
    """A resumed epoch can be checkpointed and resumed again (level 2), with other settings."""
    sizes = SIZES["uneven"]
    kw = dict(seed=1, epoch=0, block_size=4, shuffle_buffer=5)
    consumed, emitted, rest = _old_run(sizes, 3, 2, 0.4, **kw)
    s1 = rest_stream(sizes, consumed, world_size=3, num_workers=2, seed=1, epoch=0,
                     shuffle_buffer=5)
    mid = _new_run(sizes, s1, 2, 2, batch_size=4, **kw)
    consumed2 = [[min(p.num_samples, 4 * (1 + r + w)) for w, p in enumerate(row)]
                 for r, row in enumerate(mid)]
    emitted2 = {i for row, cs in zip(mid, consumed2) for p, c in zip(row, cs)
                for i in _ids(sizes, p.spans)[p.order[:c]].tolist()}
    s2 = rest_stream(sizes, consumed2, world_size=2, num_workers=2, stream=s1, level=1, seed=1,
                     epoch=0, shuffle_buffer=5, batch_size=4)
    final = _new_run(sizes, s2, 4, 1, level=2, **kw)
    _check_rest(sizes, final, rest - emitted2, "drop", None)
    assert not emitted2 & set(emitted)


def test_no_shuffle_rest_keeps_the_stream_order():
    sizes = [10, 10]
    s = rest_stream(sizes, [[3], [0]], world_size=2, num_workers=1, seed=0, epoch=0,
                    shuffle=False)
    assert s.tolist() == [[3, 20]]
    p = rest_plan(sizes, s, rank=0, world_size=1, worker=0, num_workers=1, seed=0, epoch=0,
                  shuffle=False)
    assert [(x.shard, x.start, x.stop) for x in p.spans] == [(0, 3, 10), (1, 0, 10)]
    assert p.order.tolist() == list(range(17))


def test_rest_arguments_are_checked():
    with pytest.raises(ValueError, match=r"consumed\[0\]\[0\]"):
        rest_stream([5], [[6]], world_size=1, num_workers=1, seed=0, epoch=0)
    with pytest.raises(ValueError, match="level"):
        rest_stream([5], [[1]], world_size=1, num_workers=1, seed=0, epoch=0, level=1)
    with pytest.raises(ValueError, match="stream"):
        rest_plan([5], [[0, 9]], rank=0, world_size=1, worker=0, num_workers=1, seed=0, epoch=0)
    with pytest.raises(ValueError, match="level"):
        rest_plan([5], [[0, 5]], rank=0, world_size=1, worker=0, num_workers=1, seed=0, epoch=0,
                  level=0)


# --------------------------------------------------------------------------- in-process ranks

N = 62  # 62 % 3 == 2 and 62 % 4 == 2: the remainder policies have work to do
KW = dict(decode="raw", with_keys=True, batch_size=4, block_size=4, shuffle_buffer=6, seed=3)


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> Path:
    dest = packed_raw(tmp_path_factory, classes=2, per_class=31, max_samples=8, size=(8, 8))
    assert len(shardkit.Manifest.load(dest).shards) == 8
    return dest


def _job(source, world, *, steps=None, workers=2, state=None, epoch=1, **kw):
    """Ranks of a job simulated one after the other with ``rank=``/``world_size=``.

    Every rank takes ``steps`` batches (all with None). Returns the keys per rank, the batches per
    rank, ``len(ds)`` per rank (before iterating) and the job's global state at the end.
    """
    opts = {**KW, **kw}
    keys, counts, lens, states = [], [], [], []
    for rank in range(world):
        ds = StreamingDataset(source, rank=rank, world_size=world, **opts)
        ds.set_epoch(epoch)
        if state is not None:
            ds.load_state_dict(json.loads(json.dumps(state)))  # it travels as JSON
        loader = make_loader(ds, num_workers=workers)
        lens.append(len(loader))
        assert len(ds) == len(loader)
        it = iter(loader)
        batches = list(it) if steps is None else list(itertools.islice(it, steps))
        keys.append(keys_of(batches, batched=True))
        counts.append(len(batches))
        states.append(ds.state_dict())
        del it
    return keys, counts, lens, ds.merge_states(states)


def _flat(keys_per_rank) -> list[str]:
    return [k for keys in keys_per_rank for k in keys]


_EPOCH: dict = {}


def _epoch_keys(source, world, **kw) -> list[str]:
    key = (world, tuple(sorted(kw.items())))
    if key not in _EPOCH:
        _EPOCH[key] = _flat(_job(source, world, workers=0, **kw)[0])
    return _EPOCH[key]


def _check_elastic(source, old, new, *, steps=3, old_workers=2, new_workers=2, new_kw=None,
                   **kw):
    epoch = _epoch_keys(source, old, **kw)
    head, _, _, state = _job(source, old, steps=steps, workers=old_workers, **kw)
    assert json.loads(json.dumps(state)) == state and len(state["ranks"]) == old
    rest, counts, lens, _ = _job(source, new, workers=new_workers, state=state,
                                 **{**kw, **(new_kw or {})})
    seen, got = _flat(head), _flat(rest)
    assert not Counter(seen) - Counter(epoch)
    left = set(epoch) - set(seen)  # "pad": a repeat of a consumed sample is not read again
    remainder = {**kw, **(new_kw or {})}.get("remainder", "drop")
    per_rank = len(left) // new if remainder == "drop" else -(-len(left) // new)
    assert len(set(counts)) == 1 and counts == lens  # equal batches, as len() said up front
    assert len(got) == per_rank * new
    assert set(got) <= left
    if remainder == "drop":
        assert not duplicates(got)
        assert len(left - set(got)) == len(left) % new
    else:
        assert set(got) == left
        assert len(got) - len(left) == per_rank * new - len(left)
    return head, rest


@pytest.mark.parametrize("new,new_workers", [(2, 2), (4, 1), (1, 0), (3, 1)])
def test_elastic_resume_reads_the_rest_of_the_epoch_once(source, new, new_workers):
    _check_elastic(source, 3, new, new_workers=new_workers)


@pytest.mark.parametrize("old", [1, 2])
def test_elastic_resume_from_fewer_ranks(source, old):
    _check_elastic(source, old, 3, steps=4, old_workers=1)


def test_elastic_resume_with_pad_and_a_new_batch_size(source):
    # 3 ranks x 4 samples -> 2 ranks x 6 samples: the same global batch
    _check_elastic(source, 3, 2, remainder="pad", new_kw=dict(batch_size=6))


def test_same_world_and_workers_resume_exactly_from_the_global_state(source):
    full, *_ = _job(source, 3)
    head, _, _, state = _job(source, 3, steps=2)
    rest, _, lens, _ = _job(source, 3, state=state)
    for r in range(3):
        assert head[r] + rest[r] == full[r]  # same keys, same order
    assert lens == [len(StreamingDataset(source, rank=0, world_size=3, **KW))] * 3


def test_an_elastic_epoch_can_be_checkpointed_and_resumed_again(source):
    epoch = _epoch_keys(source, 3)
    head, _, _, state = _job(source, 3, steps=2)
    mid, _, _, state2 = _job(source, 2, steps=2, state=state)
    assert state2["base"] == state
    full_rest, *_ = _job(source, 2, state=state)
    rest_exact, *_ = _job(source, 2, state=state2)  # same world: exact
    for r in range(2):
        assert mid[r] + rest_exact[r] == full_rest[r]
    rest, counts, _, _ = _job(source, 4, state=state2, workers=1)  # elastic again
    seen = _flat(head) + _flat(mid)
    assert not duplicates(seen + _flat(rest))
    left = len(epoch) - len(seen)
    assert len(_flat(rest)) == left // 4 * 4 and len(set(counts)) == 1


def test_a_single_process_state_resumes_on_many_ranks(source):
    ds = StreamingDataset(source, **KW)
    it = iter(make_loader(ds, num_workers=2))
    head = keys_of([next(it) for _ in range(5)], batched=True)
    state = ds.state_dict()
    del it
    assert "ranks" not in state and state["world_size"] == 1  # unchanged single-process form
    rest, counts, lens, _ = _job(source, 2, state=state, epoch=0)
    assert len(set(counts)) == 1 and counts == lens
    got = _flat(rest)
    assert not duplicates(head + got)
    assert len(got) == (N - len(head)) // 2 * 2


def test_unsupported_resumes_say_why(source):
    _, _, _, state = _job(source, 3, steps=1, workers=0)
    one_rank = StreamingDataset(source, rank=1, world_size=3, **KW).state_dict()
    with pytest.raises(ValueError, match="merge_states"):
        StreamingDataset(source, rank=0, world_size=2, **KW).load_state_dict(one_rank)
    with pytest.raises(ValueError, match="block_size"):
        StreamingDataset(source, rank=0, world_size=2, **{**KW, "block_size": 8}).load_state_dict(
            state)
    with pytest.raises(ValueError, match="seed"):
        StreamingDataset(source, rank=0, world_size=2, **{**KW, "seed": 4}).load_state_dict(state)
    changed = dict(state, plan=dict(state["plan"], num_samples=N + 1))
    with pytest.raises(ValueError, match="changed dataset"):
        StreamingDataset(source, rank=0, world_size=2, **KW).load_state_dict(changed)
    ds = StreamingDataset(source, rank=0, world_size=3, **KW)
    with pytest.raises(ValueError, match=r"no state for ranks \[2\]"):
        ds.merge_states([ds.state_dict(), one_rank])


# --------------------------------------------------------------------------- torchrun

TRAIN = r'''
"""A small training loop under torchrun: gloo on CPU, a DDP-like all_reduce per batch."""
import argparse, datetime, json, os, signal

import torch
import torch.distributed as dist

import shardkit

p = argparse.ArgumentParser()
p.add_argument("source")
p.add_argument("out")
p.add_argument("--epochs", type=int, default=1)
p.add_argument("--remainder", default="drop")
p.add_argument("--resume")
p.add_argument("--checkpoint-at", type=int, default=0)
p.add_argument("--kill-at", type=int, default=0)
p.add_argument("--kill-node-at", type=int, default=0)  # this node: agent, ranks, loader workers
p.add_argument("--workers", type=int, default=2)
p.add_argument("--cache-dir")
a = p.parse_args()

dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=30))
rank, world = dist.get_rank(), dist.get_world_size()  # the dataset asks the group too
ds = shardkit.StreamingDataset(a.source, decode="raw", with_keys=True, batch_size=4, seed=1,
                               block_size=4, shuffle_buffer=8, remainder=a.remainder,
                               timeout=20, retries=2, cache_dir=a.cache_dir)
assert ds.rank_world() == (rank, world)
first = 0
if a.resume:
    with open(a.resume) as f:
        state = json.load(f)
    ds.load_state_dict(state)
    first = state["epoch"]
loader = shardkit.make_loader(ds, num_workers=a.workers)
log = open(os.path.join(a.out, f"rank{rank}.jsonl"), "w")
step = 0
for epoch in range(first, a.epochs):
    ds.set_epoch(epoch)
    expected, batches = len(loader), 0
    for images, labels, keys in loader:
        grad = torch.ones(1)
        dist.all_reduce(grad)  # a rank with one batch more or less would hang here
        step += 1
        batches += 1
        log.write(json.dumps({"step": step, "epoch": epoch, "keys": keys}) + "\n")
        log.flush()
        if step == a.checkpoint_at:
            state = ds.state_dict()  # a collective: every rank gets every rank's progress
            ckpt = os.path.join(a.out, "..", "ckpt")
            os.makedirs(ckpt, exist_ok=True)
            path = os.path.join(ckpt, f"rank{rank}.json")
            with open(path + ".tmp", "w") as f:
                json.dump(state, f)
            os.replace(path + ".tmp", path)
        if step == a.kill_at:
            os.kill(os.getpid(), signal.SIGKILL)  # a node failure: no cleanup at all
        if step == a.kill_node_at and os.environ.get("KILL_THIS_NODE"):
            os.killpg(os.getpgrp(), signal.SIGKILL)  # the whole node, torchrun agent included
    log.write(json.dumps({"epoch": epoch, "batches": batches, "len": expected}) + "\n")
    log.flush()
dist.barrier()
dist.destroy_process_group()
'''

TORCHRUN_TIMEOUT = 100  # seconds; a rank with a different number of batches would hang


def _torchrun(tmp_path, name, source, *args, nproc=3, env=None) -> tuple[int, dict]:
    """Run TRAIN under torchrun with ``nproc`` ranks; (exit code, per-rank log records)."""
    script = tmp_path / "train.py"
    if not script.exists():
        script.write_text(TRAIN)
    out = tmp_path / name
    out.mkdir()
    run_env = {k: v for k, v in os.environ.items() if not k.lower().endswith("_proxy")}
    run_env.update(env or {}, GLOO_SOCKET_IFNAME="lo", NO_PROXY="127.0.0.1,localhost",
                   OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join(sys.path))
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        run_env.pop(k, None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
           str(nproc), "--local-addr", "127.0.0.1", str(script), str(source), str(out), *args]
    with open(out / "stdout.txt", "wb") as stdout:
        proc = subprocess.Popen(cmd, stdout=stdout, stderr=subprocess.STDOUT, env=run_env,
                                cwd=tmp_path, start_new_session=True)
        try:
            code = proc.wait(timeout=TORCHRUN_TIMEOUT)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, 9)  # the session we started: torchrun, ranks, loader workers
            proc.wait()
            pytest.fail(f"torchrun hung (> {TORCHRUN_TIMEOUT} s):\n"
                        f"{(out / 'stdout.txt').read_text()[-3000:]}")
    logs = {}
    for rank in range(nproc):
        path = out / f"rank{rank}.jsonl"
        logs[rank] = [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []
    return code, logs


def _steps(logs, epoch=None, upto=None) -> dict[int, list[str]]:
    """Keys per rank from the batch records (of one epoch, up to a step)."""
    return {r: [k for rec in recs if "keys" in rec and (epoch is None or rec["epoch"] == epoch)
                and (upto is None or rec["step"] <= upto) for k in rec["keys"]]
            for r, recs in logs.items()}


def _ends(logs) -> dict[int, list[dict]]:
    return {r: [rec for rec in recs if "batches" in rec] for r, recs in logs.items()}


def _output(tmp_path, name) -> str:
    return (tmp_path / name / "stdout.txt").read_text()[-3000:]


@pytest.fixture(scope="module")
def all_source_keys(source) -> list[str]:
    keys = all_keys(source)
    assert len(keys) == len(set(keys)) == N
    return keys


@pytest.mark.slow
def test_torchrun_two_epochs_from_local_disk(tmp_path, source, all_source_keys):
    t0 = time.monotonic()
    code, logs = _torchrun(tmp_path, "run", source, "--epochs", "2")
    assert code == 0, _output(tmp_path, "run")
    ends = _ends(logs)
    for rank in range(3):  # every rank: the same number of batches, as len() said
        assert [e["batches"] for e in ends[rank]] == [e["len"] for e in ends[rank]] == [5, 5]
    orders = []
    for epoch in (0, 1):
        keys = _steps(logs, epoch)
        seen = _flat(keys.values())
        assert not duplicates(seen) and set(seen) <= set(all_source_keys)
        assert len(seen) == N - N % 3  # "drop": exactly the remainder is left out
        orders.append(seen)
    assert orders[0] != orders[1]  # epochs differ
    assert time.monotonic() - t0 < 60


@pytest.mark.slow
def test_torchrun_pad_from_s3(tmp_path, source, all_source_keys):
    pytest.importorskip("s3fs")
    from servers import MotoS3

    t0 = time.monotonic()
    with MotoS3() as s3:
        s3.make_bucket("shards")
        for path in sorted(p for p in Path(source).rglob("*") if p.is_file()):
            s3.put("shards", f"ds/{path.relative_to(source).as_posix()}", path.read_bytes())
        code, logs = _torchrun(tmp_path, "run", "s3://shards/ds", "--remainder", "pad",
                               env=s3.env())
    assert code == 0, _output(tmp_path, "run")
    ends = _ends(logs)
    assert all([e["batches"] for e in ends[r]] == [e["len"] for e in ends[r]] == [6]
               for r in range(3))  # ceil(62 / 3) = 21 samples: 5 batches of 4 and one of 1
    seen = _flat(_steps(logs).values())
    assert set(seen) == set(all_source_keys)  # "pad": everything, plus one repeat
    assert len(seen) == 63 and sum(n - 1 for n in Counter(seen).values()) == 1
    assert time.monotonic() - t0 < 60


def _killed_run(tmp_path, source, checkpoint_at, kill_at):
    """3 ranks, 2 epochs, killed in epoch 1 two steps after a checkpoint."""
    code, logs = _torchrun(tmp_path, "killed", source, "--epochs", "2",
                           "--checkpoint-at", str(checkpoint_at), "--kill-at", str(kill_at))
    assert code != 0, "the run was to be killed"
    states = [json.loads((tmp_path / "ckpt" / f"rank{r}.json").read_text()) for r in range(3)]
    assert states[0] == states[1] == states[2]  # one global state, on every rank
    assert states[0]["world_size"] == 3 and states[0]["epoch"] == 1
    assert sorted(states[0]["ranks"]) == ["0", "1", "2"]
    before = _flat(_steps(logs, 1, upto=checkpoint_at).values())
    assert len(before) == 3 * 4 * (checkpoint_at - 5)  # 5 batches per rank in epoch 0
    return before


@pytest.mark.slow
@pytest.mark.parametrize("new_world", [3, 2])
def test_torchrun_killed_and_restarted_from_its_checkpoint(tmp_path, source, new_world):
    """A job dies mid-epoch; restarted from the checkpoint (same world or 3 -> 2 ranks), it
    reads exactly the samples of the epoch that were not consumed before the checkpoint."""
    t0 = time.monotonic()
    before = _killed_run(tmp_path, source, checkpoint_at=7, kill_at=9)
    code, logs = _torchrun(tmp_path, "resumed", source, "--epochs", "2", "--resume",
                           str(tmp_path / "ckpt" / "rank0.json"), nproc=new_world)
    assert code == 0, _output(tmp_path, "resumed")
    after = _flat(_steps(logs, 1).values())
    ends = _ends(logs)
    counts = {r: ends[r][0]["batches"] for r in range(new_world)}
    assert len(set(counts.values())) == 1  # equal batches: nobody waits at the all_reduce
    assert not duplicates(before + after)
    left = N - N % 3 - len(before)
    if new_world == 3:  # exact resume: the rest of each rank's epoch
        assert len(before) + len(after) == N - N % 3
    else:  # elastic: the rest dealt to 2 ranks ("drop" of the rest's remainder, if any)
        assert len(after) == left // 2 * 2
        assert all(ends[r][0]["len"] == counts[r] for r in range(new_world))
    assert time.monotonic() - t0 < 60


def _agent(tmp_path, out, source, args, *, nnodes, node, port, env) -> subprocess.Popen:
    """One torchrun agent ("node") of a job of ``nnodes`` (c10d rendezvous on 127.0.0.1), its own
    session (so the node can be killed whole), 2 ranks, its node-local shard cache."""
    run_env = {k: v for k, v in os.environ.items() if not k.lower().endswith("_proxy")}
    run_env.update(env, GLOO_SOCKET_IFNAME="lo", NO_PROXY="127.0.0.1,localhost",
                   OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join(sys.path))
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        run_env.pop(k, None)
    rdzv = ["--nnodes", str(nnodes), "--rdzv-backend", "c10d", "--rdzv-id", out.name,
            "--rdzv-endpoint", f"127.0.0.1:{port}", "--max-restarts", "0",
            "--rdzv-conf", f"is_host={'true' if node == 0 else 'false'}"]
    cmd = [sys.executable, "-m", "torch.distributed.run", *rdzv, "--nproc_per_node", "2",
           "--local-addr", "127.0.0.1", str(tmp_path / "train.py"), str(source), str(out),
           "--workers", "1", "--cache-dir", str(tmp_path / f"cache-node{node}"), *args]
    log = open(out / f"node{node}.txt", "wb")
    return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=run_env, cwd=tmp_path,
                            start_new_session=True)


def _job_of_nodes(tmp_path, name, source, args, *, nnodes, env, kill_node=None):
    """A job of ``nnodes`` agents; (exit codes, per-rank log records)."""
    import socket

    (tmp_path / "train.py").write_text(TRAIN)
    out = tmp_path / name
    out.mkdir()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = [_agent(tmp_path, out, source, args, nnodes=nnodes, node=n, port=port,
                    env={**env, **({"KILL_THIS_NODE": "1"} if n == kill_node else {})})
             for n in range(nnodes)]
    codes = []
    for proc in procs:
        try:
            codes.append(proc.wait(timeout=TORCHRUN_TIMEOUT))
        except subprocess.TimeoutExpired:
            for p in procs:
                try:
                    os.killpg(p.pid, 9)
                except ProcessLookupError:
                    pass
                p.wait()
            pytest.fail(f"a node hung (> {TORCHRUN_TIMEOUT} s):\n" + "\n".join(
                (out / f"node{n}.txt").read_text()[-2000:] for n in range(nnodes)))
    logs = {}
    for path in sorted(out.glob("rank*.jsonl")):
        rank = int(path.stem[4:])
        logs[rank] = [json.loads(line) for line in path.read_text().splitlines()]
    return codes, logs


@pytest.mark.slow
def test_two_nodes_one_killed_then_one_node_then_two_again(tmp_path, source, all_source_keys):
    """torchrun --nnodes 2 --nproc_per_node 2 over S3 with a cache per node; node 1 is killed
    (SIGKILL, agent and all) after a checkpoint; the job goes on from it on 1 node x 2 (elastic),
    checkpoints and dies again; then on 2 x 2 it finishes the epoch. Every sample of the epoch is
    read once over what the checkpoints had consumed and the last run."""
    pytest.importorskip("s3fs")
    from servers import MotoS3

    with MotoS3() as s3:
        s3.make_bucket("shards")
        for path in sorted(p for p in Path(source).rglob("*") if p.is_file()):
            s3.put("shards", f"ds/{path.relative_to(source).as_posix()}", path.read_bytes())
        src, env = "s3://shards/ds", s3.env()
        ckpt = tmp_path / "ckpt"
        # 1. 2 nodes x 2 ranks: 62 samples, 15 per rank (drop 2), batches of 4 -> 4 steps
        codes, logs = _job_of_nodes(tmp_path, "a", src, ["--checkpoint-at", "2",
                                                          "--kill-node-at", "3"],
                                    nnodes=2, env=env, kill_node=1)
        assert codes[0] != 0 and codes[1] != 0  # node 1 died; node 0's ranks lost their peers
        state_a = json.loads((ckpt / "rank0.json").read_text())
        assert state_a["world_size"] == 4 and sorted(state_a["ranks"]) == ["0", "1", "2", "3"]
        head_a = _flat(_steps(logs, 0, upto=2).values())
        assert len(head_a) == 4 * 2 * 4
        assert (tmp_path / "cache-node0").is_dir() and (tmp_path / "cache-node1").is_dir()
        # 2. one node left: 2 ranks resume the epoch elastically, checkpoint, die
        (ckpt / "rank0.json").rename(tmp_path / "state_a.json")
        codes, logs = _job_of_nodes(tmp_path, "b", src, ["--resume", str(tmp_path / "state_a.json"),
                                                          "--checkpoint-at", "2", "--kill-at", "3"],
                                    nnodes=1, env=env)
        assert codes[0] != 0
        state_b = json.loads((ckpt / "rank0.json").read_text())
        assert state_b["world_size"] == 2 and state_b["base"]["world_size"] == 4
        head_b = _flat(_steps(logs, 0, upto=2).values())
        assert len(head_b) == 2 * 2 * 4
        # 3. two nodes again: the rest of the epoch
        codes, logs = _job_of_nodes(tmp_path, "c", src, ["--resume", str(ckpt / "rank0.json")],
                                    nnodes=2, env=env)
        assert codes == [0, 0], (tmp_path / "c" / "node0.txt").read_text()[-3000:]
    rest = _flat(_steps(logs, 0).values())
    ends = _ends(logs)
    assert len({ends[r][0]["batches"] for r in range(4)}) == 1  # equal batches on every rank
    seen = head_a + head_b + rest
    assert not duplicates(seen) and set(seen) <= set(all_source_keys)
    left = N - N % 4 - len(head_a) - len(head_b)  # what the last run had to deal: 12 samples
    assert len(rest) == left - left % 4  # its own remainder policy ("drop") aside

