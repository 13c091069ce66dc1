"""kop_triton.curves: the TensorBoard event writer, read back with TensorBoard's own reader and
protobuf classes (an independent implementation of the format), and the curves PNG."""
from __future__ import annotations

import json
import random
import struct
from pathlib import Path

import pytest

from kop_triton import curves

tb = pytest.importorskip("tensorboard", reason="the tests read the event files with TensorBoard's reader "
                                                "(in the Makefile's DEPS)")
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator  # noqa: E402
from tensorboard.compat.proto import event_pb2  # noqa: E402
from tensorboard.compat.tensorflow_stub.pywrap_tensorflow import masked_crc32c as tb_masked_crc32c  # noqa: E402


def f32(x: float) -> float:
    return struct.unpack("<f", struct.pack("<f", x))[0]


def scalars(logdir) -> dict:
    """tag -> [(step, value)] as TensorBoard shows them."""
    ea = EventAccumulator(str(logdir), size_guidance={"scalars": 0})
    ea.Reload()
    return {t: [(e.step, e.value) for e in ea.Scalars(t)] for t in ea.Tags()["scalars"]}


def raw_records(path: Path) -> list:
    """The records of a TFRecord file, each checked with TensorBoard's masked CRC-32C."""
    data, out, i = path.read_bytes(), [], 0
    while i < len(data):
        header = data[i:i + 8]
        (n,) = struct.unpack("<Q", header)
        assert struct.unpack("<I", data[i + 8:i + 12])[0] == tb_masked_crc32c(header)
        body = data[i + 12:i + 12 + n]
        assert struct.unpack("<I", data[i + 12 + n:i + 16 + n])[0] == tb_masked_crc32c(body)
        out.append(body)
        i += 16 + n
    assert i == len(data)
    return out


def test_crc32c_matches_the_standard_vector_and_tensorboards():
    assert curves.crc32c(b"123456789") == 0xE3069283                 # the CRC-32C check value
    assert curves.crc32c(b"") == 0
    rng = random.Random(0)
    for n in (0, 1, 7, 8, 100, 1000):
        data = bytes(rng.randrange(256) for _ in range(n))
        assert curves.masked_crc32c(data) == tb_masked_crc32c(data)


def test_events_decode_with_tensorboards_protobuf_and_accumulator(tmp_path):
    w = curves.TensorBoardWriter(tmp_path)
    w.scalars(1, {"train/loss": 4.25, "train/lr": 1e-4}, wall_time=1000.5)
    w.scalars(2 ** 40, {"train/loss": 1.0 / 3.0, "skipped": None, "nan": float("nan")}, wall_time=1001.25)
    w.scalars(7, {"val/ce": -2.5e-3})
    w.close()
    files = list(tmp_path.iterdir())
    assert len(files) == 1 and files[0].name.startswith("events.out.tfevents.")
    events = [event_pb2.Event.FromString(r) for r in raw_records(files[0])]
    assert events[0].file_version == "brain.Event:2"
    assert (events[1].wall_time, events[1].step) == (1000.5, 1)
    assert {v.tag: v.simple_value for v in events[1].summary.value} == {"train/loss": 4.25, "train/lr": f32(1e-4)}
    assert (events[2].wall_time, events[2].step) == (1001.25, 2 ** 40)
    # None and NaN are left out
    assert [(v.tag, v.simple_value) for v in events[2].summary.value] == [("train/loss", f32(1 / 3))]
    got = scalars(tmp_path)
    assert got == {"train/loss": [(1, 4.25), (2 ** 40, f32(1 / 3))], "train/lr": [(1, f32(1e-4))],
                   "val/ce": [(7, f32(-2.5e-3))]}


def test_a_resumed_session_hides_the_orphaned_steps_and_keeps_the_old_file(tmp_path):
    first = curves.TensorBoardWriter(tmp_path)
    for step in range(1, 7):
        first.scalars(step, {"train/loss": float(step)})
    first.close()
    before = first.path.read_bytes()
    second = curves.TensorBoardWriter(tmp_path, purge_step=4)       # resumed from a checkpoint at step 3
    for step in range(4, 9):
        second.scalars(step, {"train/loss": 100.0 + step})
    second.close()
    assert first.path.read_bytes() == before                         # the old file is untouched
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([first.path.name, second.path.name])
    assert sorted(p.name for p in tmp_path.iterdir())[0] == first.path.name   # name order = writing order
    assert scalars(tmp_path)["train/loss"] == [(1, 1.0), (2, 2.0), (3, 3.0)] + [(s, 100.0 + s) for s in range(4, 9)]
    # without the SessionLog START the same files show steps 4-6 twice (what the purge prevents)
    plain = tmp_path / "plain"
    plain.mkdir()
    for name in (first.path.name, second.path.name):
        (plain / name).write_bytes((tmp_path / name).read_bytes())
    recs = raw_records(plain / second.path.name)
    start = event_pb2.Event.FromString(recs[1])
    assert (start.step, start.session_log.status) == (4, event_pb2.SessionLog.START)
    body = b"".join(curves.tfrecord(r) for r in recs if not event_pb2.Event.FromString(r).HasField("session_log"))
    (plain / second.path.name).write_bytes(body)
    assert [s for s, _ in scalars(plain)["train/loss"]].count(4) == 2


def test_writers_in_the_same_second_get_new_files(tmp_path):
    paths = []
    for _ in range(3):
        w = curves.TensorBoardWriter(tmp_path)
        w.close()
        paths.append(w.path.name)
    assert len(set(paths)) == 3 and sorted(paths) == paths


def png_size(path: Path) -> tuple:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def test_plot_run_draws_a_log_without_the_new_fields(tmp_path):
    """A log.jsonl as the runs before TensorBoard support wrote it (train: loss, lr, skipped_steps,
    time), a line cut short by a kill, and a step logged twice: drawn."""
    lines = [json.dumps({"event": "start", "step": 0, "args": {"steps": 40}})]
    lines += [json.dumps({"event": "train", "step": s, "loss": 4.0 - s / 20, "lr": 1e-3, "skipped_steps": 0,
                          "time": 1.0}) for s in range(10, 50, 10)]
    lines += [json.dumps({"event": "eval", "step": s, "val_ce": 3.5 - s / 40, "val_ppl": 2.718 ** (3.5 - s / 40)})
              for s in (20, 40)]
    lines += [json.dumps({"event": "train", "step": 20, "loss": 3.0, "lr": 1e-3, "skipped_steps": 0}), '{"event": "tr']
    (tmp_path / "log.jsonl").write_text("\n".join(lines) + "\n")
    out = curves.plot_run(tmp_path)
    assert out == tmp_path / "curves.png" and png_size(out) == (1100, 420)
    recs = curves.read_log(tmp_path / "log.jsonl")
    assert [(r["event"], r["step"]) for r in recs if r["event"] == "train"] == [("train", s) for s in (10, 20, 30, 40)]
    assert [r["loss"] for r in recs if r["event"] == "train" and r["step"] == 20] == [3.0]   # the last one wins
    with pytest.raises(FileNotFoundError, match="log.jsonl"):
        curves.plot_run(tmp_path / "nope")


def test_tensorboard_scalars_of_a_record():
    assert curves.tensorboard_scalars({"event": "train", "step": 3, "loss": 2.0, "lr": 0.1, "grad_norm": None,
                                       "skipped_steps": 0}) == {"train/loss": 2.0, "train/lr": 0.1}
    assert curves.tensorboard_scalars({"event": "eval", "step": 3, "val_ce": 1.0, "val_ppl": 2.7, "best_val_ppl": 2.7,
                                       "train_loss": 1.1}) == {"val/ce": 1.0, "val/ppl": 2.7, "val/best_ppl": 2.7}
    assert curves.tensorboard_scalars({"event": "done", "step": 3}) == {}
