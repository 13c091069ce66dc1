"""Training curves of a ``kop-train`` run: TensorBoard event files and a loss / perplexity PNG.

TensorBoard: ``TensorBoardWriter`` writes the ``tfevents`` format itself (TFRecord framing with
masked CRC-32C checksums around hand-encoded ``Event`` protocol buffers holding scalar summaries),
so writing needs neither TensorFlow nor the ``tensorboard`` package; reading them is TensorBoard's
job (``tensorboard --logdir RUN/tensorboard``).  Every training session of a run writes a new file
(earlier ones are never touched); a resumed session first writes a ``SessionLog START`` at the
first step it trains, which makes TensorBoard drop what a killed session had logged past the
checkpoint it resumed from (TensorBoard's purge of orphaned data), so no step appears twice.

PNG: ``plot_run(run_dir)`` draws ``curves.png`` from the run's ``log.jsonl`` (training loss, and
validation CE and perplexity at every evaluation); ``kop-train`` redraws it after every evaluation,
``kop-train --plot RUN_DIR`` draws it for any run, finished, running or from before this module.
"""
from __future__ import annotations

import json
import math
import os
import socket
import struct
import time
from pathlib import Path
from typing import Iterable, Optional

# ------------------------------------------------------------------------------- TFRecord / Event encoding


def _crc32c_table() -> list:
    table = []
    for i in range(256):
        c = i
        for _ in range(8):
            c = (c >> 1) ^ 0x82F63B78 if c & 1 else c >> 1
        table.append(c)
    return table


_CRC_TABLE = _crc32c_table()


def crc32c(data: bytes) -> int:
    """CRC-32C (Castagnoli), the checksum of TFRecord files."""
    c = 0xFFFFFFFF
    for b in data:
        c = _CRC_TABLE[(c ^ b) & 0xFF] ^ (c >> 8)
    return c ^ 0xFFFFFFFF


def masked_crc32c(data: bytes) -> int:
    """TFRecord's masked CRC: rotate right by 15 bits and add 0xa282ead8."""
    c = crc32c(data)
    return (((c >> 15) | (c << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def tfrecord(data: bytes) -> bytes:
    """One TFRecord: length (uint64 LE), its masked CRC, the data, the data's masked CRC."""
    header = struct.pack("<Q", len(data))
    return header + struct.pack("<I", masked_crc32c(header)) + data + struct.pack("<I", masked_crc32c(data))


def _varint(n: int) -> bytes:
    n &= (1 << 64) - 1                      # int64 as protobuf encodes it (two's complement)
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def _field_bytes(number: int, payload: bytes) -> bytes:
    return _varint(number << 3 | 2) + _varint(len(payload)) + payload


def encode_event(wall_time: float, step: int, *, file_version: Optional[str] = None,
                 scalars: Optional[dict] = None, session_start: bool = False) -> bytes:
    """An ``Event`` message (tensorflow/core/util/event.proto): wall_time (1, double), step (2,
    int64), file_version (3), summary (5: repeated Value{tag (1), simple_value (2, float)}),
    session_log (7: SessionLog{status (1) = START (1)})."""
    out = b"\x09" + struct.pack("<d", float(wall_time)) + b"\x10" + _varint(int(step))
    if file_version is not None:
        out += _field_bytes(3, file_version.encode("utf-8"))
    if scalars:
        summary = b"".join(_field_bytes(1, _field_bytes(1, str(tag).encode("utf-8")) + b"\x15" +
                                        struct.pack("<f", float(value)))
                           for tag, value in scalars.items())
        out += _field_bytes(5, summary)
    if session_start:
        out += _field_bytes(7, b"\x08\x01")
    return out


class TensorBoardWriter:
    """Scalars of one training session in a new ``events.out.tfevents.*`` file of ``logdir``.

    ``purge_step``: write ``SessionLog START`` at this step first (a resumed run: TensorBoard then
    hides what earlier files hold at steps >= purge_step).  Every record is flushed at once, so a
    killed run leaves a readable file.  File names start with a sequence number, so they sort in
    the order the sessions wrote them (TensorBoard reads a run's files in name order)."""

    def __init__(self, logdir, purge_step: Optional[int] = None):
        self.logdir = Path(logdir)
        self.logdir.mkdir(parents=True, exist_ok=True)
        seq = len(list(self.logdir.glob("events.out.tfevents.*")))
        while True:
            name = f"events.out.tfevents.{seq:04d}.{int(time.time())}.{socket.gethostname()}.{os.getpid()}"
            self.path = self.logdir / name
            try:
                self._f = open(self.path, "xb")    # never reopen (and so overwrite) an existing file
                break
            except FileExistsError:
                seq += 1
        self._write(encode_event(time.time(), 0, file_version="brain.Event:2"))
        if purge_step is not None:
            self._write(encode_event(time.time(), int(purge_step), session_start=True))

    def _write(self, event: bytes) -> None:
        self._f.write(tfrecord(event))
        self._f.flush()

    def scalars(self, step: int, values: dict, wall_time: Optional[float] = None) -> None:
        """One event at ``step`` with a scalar per tag (None and non-finite values are left out)."""
        values = {k: v for k, v in values.items() if v is not None and math.isfinite(float(v))}
        if values:
            self._write(encode_event(time.time() if wall_time is None else wall_time, step, scalars=values))

    def close(self) -> None:
        if not self._f.closed:
            self._f.close()


# ------------------------------------------------------------------------------- the log and its PNG

# log.jsonl field -> TensorBoard tag, per record kind (what kop-train logs; see train.py)
TRAIN_TAGS = {"loss": "train/loss", "lr": "train/lr", "grad_norm": "train/grad_norm",
              "tokens_per_s": "train/tokens_per_s"}
EVAL_TAGS = {"val_ce": "val/ce", "val_ppl": "val/ppl", "best_val_ppl": "val/best_ppl"}


def tensorboard_scalars(record: dict) -> dict:
    """The TensorBoard scalars of one log.jsonl record (train or eval), by tag."""
    tags = TRAIN_TAGS if record.get("event") == "train" else EVAL_TAGS if record.get("event") == "eval" else {}
    return {tag: record[key] for key, tag in tags.items() if record.get(key) is not None}


def read_log(path) -> list:
    """The records of a log.jsonl (a line cut short by a kill is skipped); when a step appears
    twice for the same event (a log from before resumes truncated it), the last record wins."""
    records = {}
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(rec, dict) and "event" in rec:
            records[(rec["event"], rec.get("step"), len(records) if rec["event"] == "start" else 0)] = rec
    return sorted(records.values(), key=lambda r: (r.get("step") or 0, r["event"] != "start"))


def _series(records: Iterable[dict], event: str, key: str):
    pts = [(r["step"], r[key]) for r in records if r.get("event") == event and r.get(key) is not None
           and math.isfinite(float(r[key]))]
    return [p[0] for p in pts], [p[1] for p in pts]


def plot_run(run_dir, out=None) -> Path:
    """Draw ``out`` (default ``run_dir/curves.png``) from ``run_dir/log.jsonl``: left, training loss
    and validation CE against the step; right, validation perplexity.  Written atomically.
    Raises FileNotFoundError without a log and ImportError without matplotlib."""
    run_dir = Path(run_dir)
    log = run_dir / "log.jsonl"
    if not log.is_file():
        raise FileNotFoundError(f"{log} not found: --plot takes a kop-train run directory (its --out)")
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    records = read_log(log)
    out = Path(out) if out is not None else run_dir / "curves.png"
    ts, tl = _series(records, "train", "loss")
    es, ec = _series(records, "eval", "val_ce")
    ps, pp = _series(records, "eval", "val_ppl")
    start = next((r for r in records if r["event"] == "start"), {})
    total = (start.get("args") or {}).get("steps")
    fig = Figure(figsize=(11, 4.2))
    FigureCanvasAgg(fig)
    ax, bx = fig.subplots(1, 2)
    if ts:
        ax.plot(ts, tl, lw=0.8, color="tab:blue", alpha=0.75, label="train loss (batch)")
    if es:
        ax.plot(es, ec, "o-", ms=4, color="tab:orange", label="validation CE")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats / token)")
    ax.grid(alpha=0.3)
    if ts or es:
        ax.legend(fontsize=8)
    if ps:
        bx.plot(ps, pp, "o-", ms=4, color="tab:orange")
        best = min(range(len(pp)), key=pp.__getitem__)
        bx.annotate(f"best {pp[best]:.3f} (step {ps[best]})", (ps[best], pp[best]), textcoords="offset points",
                    xytext=(-10, 12), ha="right", fontsize=8)
        if max(pp) / max(min(pp), 1e-9) > 20:
            bx.set_yscale("log")
    bx.set_xlabel("step")
    bx.set_ylabel("validation perplexity")
    bx.grid(alpha=0.3)
    for a in (ax, bx):
        if total:
            a.set_xlim(0, total)
    last = max([0] + ts + es)
    fig.suptitle(f"{run_dir.name}: step {last}" + (f" of {total}" if total else ""), fontsize=10)
    fig.tight_layout()
    tmp = out.with_name(out.name + ".tmp.png")
    fig.savefig(tmp, dpi=100)
    os.replace(tmp, out)
    return out
