"""Packing: a step's padded rows laid end to end in fixed-size bins, the train step's input layout.

An optimisation behind the objective (`rl.pg_loss`), never a change to it: every trained token
sees in its bin exactly the tokens it sees in its own row, so its log-prob is the same; rows
that cannot change the gradient (no target, or advantage exactly 0) are left out; the samples of
one question attend to one copy of their common prompt. Pure numpy on the host;
`rl.global_batch` calls `pack` per device and puts the result on the mesh.

Test: `pytest tests/test_rl.py -k pack`.
"""
from __future__ import annotations

from typing import NamedTuple

import numpy as np

from jaxrl import model as gpt


class Packed(NamedTuple):
    """A step's rows packed for training: on each device, rows are laid end to end in bins of T
    tokens, and the samples of one question attend to one copy of their common prompt, so the
    forward/backward runs on the tokens that carry a gradient (plus one prompt per bin) instead
    of on every row padded to the longest one. Every token sees what it sees in its own row.

    Bin arrays (n_dev · bins_per_device, T) and row arrays (R,) are both split over the data axis:
    device d holds bins [d·B, (d+1)·B) and rows [d·R/n, (d+1)·R/n), `rows` indexing the latter.
    """

    inputs: np.ndarray  # (NB, T) int32 token ids (pad where empty)
    targets: np.ndarray  # (NB, T) int32, -1 = not trained on
    positions: np.ndarray  # (NB, T) int32 position of each token in its own row
    segments: np.ndarray  # (NB, T) int32 piece id within the bin (a prompt copy or a continuation), 0 = empty
    parents: np.ndarray  # (NB, T) int32 the prompt copy a continuation extends (else its own id)
    prev_index: np.ndarray  # (NB, T) int32 index in the bin of the previous token of the same row
    rows: np.ndarray  # (NB, T) int32 the token's row, indexed within its device's rows; -1 = none
    sampler_logp: np.ndarray  # (NB, T) f32
    advantages: np.ndarray  # (R,) f32, rows in the Batch's order
    row_tokens: np.ndarray  # (R,) int32 trained tokens of each row (all rows, packed or not)
    bins: np.ndarray  # (n_dev,) int32 bins in use on each device

    def packing(self) -> gpt.Packing:
        return gpt.Packing(self.segments, self.parents, self.prev_index)


def pack(batch, pad_id: int, *, n_dev: int = 1, chunk: int = 8, min_len: int = 0,
         skip_zero_advantage: bool = True, group: int = 1) -> Packed:
    """Pack each device's share of `batch` (an `rl.Batch`: contiguous blocks of R/n_dev rows) into bins.

    A row is cut after its last target (later tokens cannot change earlier ones); rows without a
    target, and with `skip_zero_advantage` rows whose advantage is exactly 0 (their gradient is
    exactly 0), are left out; their tokens still count in the normalisation (`row_tokens`).
    Rows of one `group` (a question's samples, contiguous) share their common untrained prefix
    (the prompt): a bin holds one copy of it, and each row's continuation (from the prompt's last
    token on) attends to that copy. Bins hold T = max(batch length, min_len) tokens (a caller
    keeps T fixed across steps to avoid recompiling); first fit, longest first. Each device gets
    the same number of bin slots, a multiple of `chunk` (bins per forward/backward), enough for
    the unpacked worst case.
    """
    inputs, targets = np.asarray(batch.inputs), np.asarray(batch.targets)
    adv = np.asarray(batch.advantages, np.float32)
    R, T0 = inputs.shape
    if R % n_dev:
        raise ValueError(f"{R} training rows do not split over {n_dev} devices")
    T = max(T0, int(min_len))
    per = R // n_dev
    nb = -(-per // chunk) * chunk
    valid = targets >= 0
    row_tokens = valid.sum(axis=1).astype(np.int32)
    rows = _RowInfo(inputs, targets, np.asarray(batch.sampler_logp, np.float32), np.argmax(valid, axis=1),
                    np.where(row_tokens > 0, T0 - np.argmax(valid[:, ::-1], axis=1), 0))
    keep = (row_tokens > 0) & ~(skip_zero_advantage & (adv == 0))
    out = {k: np.full((n_dev * nb, T), fill, dt) for k, fill, dt in (
        ("inputs", pad_id, np.int32), ("targets", -1, np.int32), ("positions", 0, np.int32),
        ("segments", 0, np.int32), ("parents", 0, np.int32), ("rows", -1, np.int32),
        ("sampler_logp", 0.0, np.float32))}
    out["prev_index"] = np.tile(np.arange(T, dtype=np.int32), (n_dev * nb, 1))
    bins = np.zeros(n_dev, np.int32)
    for d in range(n_dev):
        bins[d] = _Bins(out, d * nb, d * per, T).pack(rows, keep, range(d * per, (d + 1) * per), group)
    return Packed(**out, advantages=adv, row_tokens=row_tokens, bins=bins)


class _RowInfo(NamedTuple):
    inputs: np.ndarray
    targets: np.ndarray
    logp: np.ndarray
    first: np.ndarray  # index of each row's first target
    end: np.ndarray  # one past each row's last target (0: no target)


class _Bins:
    """One device's bins in the packed arrays `out`: rows [base, base + B), row ids from row0."""

    def __init__(self, out: dict, base: int, row0: int, T: int):
        self.out, self.base, self.row0, self.T = out, base, row0, T
        self.fill, self.pieces, self.prompts = [], [], {}  # per bin: tokens used, pieces; (bin, group) -> prompt copy

    def pack(self, info: _RowInfo, keep, rows: range, group: int) -> int:
        """Place the kept rows group by group, longest continuation first; returns the bins used."""
        for g0 in range(rows.start, rows.stop, group):
            mine = [r for r in range(g0, min(g0 + group, rows.stop)) if keep[r]]
            if not mine:
                continue
            P = int(min(info.first[r] for r in mine)) if len(mine) > 1 else 0
            for r in mine[1:]:  # the common prefix of the kept rows (the prompt)
                diff = np.nonzero(info.inputs[r, :P] != info.inputs[mine[0], :P])[0]
                P = int(diff[0]) if len(diff) else P
            for r in sorted(mine, key=lambda r: (-info.end[r], r)):
                self._place(info, r, g0, P)
        return len(self.fill)

    def _place(self, info: _RowInfo, r: int, g0: int, P: int):
        c = int(info.end[r]) - P
        b = next((j for j in range(len(self.fill)) if (j, g0) in self.prompts and self.fill[j] + c <= self.T), None)
        if b is None:  # first bin with room for a prompt copy and the continuation
            b = next((j for j, f in enumerate(self.fill) if f + P + c <= self.T), len(self.fill))
            if b == len(self.fill):
                self.fill.append(0)
                self.pieces.append(0)
            if P:  # the prompt copy: no targets, positions from 0, attends to itself
                seg, o = self._write(b, info.inputs[r, :P], pos0=0)
                self.prompts[(b, g0)] = (seg, o + P - 1)
        parent, prev0 = self.prompts[(b, g0)] if P else (None, None)
        sl = slice(P, int(info.end[r]))
        self._write(b, info.inputs[r, sl], pos0=P, targets=info.targets[r, sl], logp=info.logp[r, sl],
                    row=r - self.row0, parent=parent, prev0=prev0)

    def _write(self, b, ids, *, pos0, targets=None, logp=None, row=-1, parent=None, prev0=None):
        """Append one piece to bin b; returns (its segment id, its offset).

        `pos0`: the row position of its first token. A continuation names its row, its targets and
        sampler log-probs, the prompt copy it extends (`parent`) and that copy's last token (`prev0`).
        """
        out, g, o, n = self.out, self.base + b, self.fill[b], len(ids)
        self.pieces[b] += 1
        seg = self.pieces[b]
        out["inputs"][g, o:o + n] = ids
        if targets is not None:
            out["targets"][g, o:o + n] = targets
            out["sampler_logp"][g, o:o + n] = logp
            out["rows"][g, o:o + n] = row
        out["positions"][g, o:o + n] = np.arange(pos0, pos0 + n)
        out["segments"][g, o:o + n] = seg
        out["parents"][g, o:o + n] = seg if parent is None else parent
        out["prev_index"][g, o:o + n] = np.concatenate([[o if prev0 is None else prev0], np.arange(o, o + n - 1)])
        self.fill[b] += n
        return seg, o
