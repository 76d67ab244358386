"""Query blocks are aligned to absolute positions (vllm_hip_kernels.query_blocks)."""

from __future__ import annotations

import pytest
import torch

from vllm_hip_kernels.query_blocks import build_query_blocks

BQ = 16


def _blocks(q_lens, seq_lens):
    """Query blocks of sequences with ``q_lens`` new queries ending at ``seq_lens``."""
    qsl = torch.tensor([0, *torch.tensor(q_lens).cumsum(0).tolist()])
    return build_query_blocks(qsl, torch.tensor(seq_lens), block_size_q=BQ, sink_tokens=4, window_tokens=32)


@pytest.mark.parametrize("ctx,n", [(0, 50), (5, 1), (16, 40), (21, 100), (31, 1), (33, 14), (47, 2)])
def test_blocks_cover_the_queries_once_and_only_a_head_block_is_unaligned(ctx, n):
    qb = _blocks([n], [ctx + n])
    pos, q_len, q_start = qb.pos.tolist(), qb.q_len.tolist(), qb.q_start.tolist()
    covered = [p + i for p, m in zip(pos, q_len) for i in range(m)]
    assert covered == list(range(ctx, ctx + n))
    assert q_start == [p - ctx for p in pos]
    for j, (p, m) in enumerate(zip(pos, q_len)):
        assert 1 <= m <= BQ and (p + m - 1) // BQ == p // BQ  # never crosses a boundary
        if j > 0:
            assert p % BQ == 0


@pytest.mark.parametrize("cut", [7, 16, 333 % 64, 40])
def test_chunked_prefill_changes_only_the_block_that_straddles_the_cut(cut):
    n = 64
    whole = _blocks([n], [n])
    first, second = _blocks([cut], [cut]), _blocks([n - cut], [n])
    one = set(zip(whole.pos.tolist(), whole.q_len.tolist()))
    two = set(zip(first.pos.tolist(), first.q_len.tolist())) | set(zip(second.pos.tolist(), second.q_len.tolist()))
    straddling = {(p, m) for p, m in one if p < cut < p + m}
    pieces = {(p, m) for p, m in two if cut % BQ and p // BQ == cut // BQ}  # its two halves
    assert len(straddling) == (1 if cut % BQ else 0) and len(pieces) == 2 * len(straddling)
    assert one - straddling == two - pieces


def test_split_last_gives_each_sequence_last_query_its_own_block():
    q_lens, seq_lens = [70, 1, 30, 16], [70, 500, 130, 48]
    qsl = torch.tensor([0, *torch.tensor(q_lens).cumsum(0).tolist()])
    plain = build_query_blocks(qsl, torch.tensor(seq_lens), block_size_q=BQ, sink_tokens=4, window_tokens=32)
    split = build_query_blocks(qsl, torch.tensor(seq_lens), block_size_q=BQ, sink_tokens=4, window_tokens=32,
                               split_last=True)
    for s, (n, end) in enumerate(zip(q_lens, seq_lens)):
        rows = (split.seq == s).nonzero().flatten()
        pos, q_len = split.pos[rows].tolist(), split.q_len[rows].tolist()
        assert (pos[-1], q_len[-1]) == (end - 1, 1)  # the last query alone
        assert [p + i for p, m in zip(pos, q_len) for i in range(m)] == list(range(end - n, end))
        # every other block as without the split, the last one a query shorter (decode rows and
        # blocks that already held one query are left as they were)
        old = (plain.seq == s).nonzero().flatten()
        old_pos, old_len = plain.pos[old].tolist(), plain.q_len[old].tolist()
        if old_len[-1] == 1:
            assert (pos, q_len) == (old_pos, old_len)
        else:
            assert pos[:-1] == old_pos and q_len[:-2] == old_len[:-1] and q_len[-2] == old_len[-1] - 1
    assert split.q_start.tolist() == sorted(split.q_start.tolist())
    assert split.window_start.tolist() == [max(4, p - 32 + 1) for p in split.pos.tolist()]


def test_split_last_per_sequence_splits_only_where_asked():
    qsl, lens = torch.tensor([0, 70, 100]), torch.tensor([70, 130])
    both = build_query_blocks(qsl, lens, block_size_q=BQ, sink_tokens=4, window_tokens=32, split_last=True)
    one = build_query_blocks(qsl, lens, block_size_q=BQ, sink_tokens=4, window_tokens=32,
                             split_last=torch.tensor([False, True]))
    none = build_query_blocks(qsl, lens, block_size_q=BQ, sink_tokens=4, window_tokens=32)
    for s, want in ((0, none), (1, both)):
        got_rows, want_rows = (one.seq == s).nonzero().flatten(), (want.seq == s).nonzero().flatten()
        assert one.pos[got_rows].tolist() == want.pos[want_rows].tolist()
        assert one.q_len[got_rows].tolist() == want.q_len[want_rows].tolist()
    with pytest.raises(ValueError, match="a bool per sequence"):
        build_query_blocks(qsl, lens, block_size_q=BQ, sink_tokens=4, window_tokens=32,
                           split_last=torch.tensor([True]))


def _loop_blocks(q_lens, seq_lens, bq, sink, window, split):
    """The blocks by the definition, one query at a time: (seq, q_start, q_len, pos, W0) rows."""
    rows, q0 = [], 0
    for s, (n, total) in enumerate(zip(q_lens, seq_lens)):
        cur = None
        for i in range(n):
            p = total - n + i
            last_split = split[s] and i == n - 1 and n > 1 and cur is not None
            if cur is None or p % bq == 0 or last_split:
                cur = [s, q0 + i, 0, p]
                rows.append(cur)
            cur[2] += 1
            if last_split:
                cur = None  # the split-off query closes its sequence
        q0 += n
    return [(s, st, m, p, max(sink, p - window + 1)) for s, st, m, p in rows]


def test_blocks_equal_their_definition_on_random_batches():
    import random

    rng = random.Random(0)
    for _ in range(400):
        ns = rng.randint(0, 6)
        q_lens = [rng.choice([0, 1, 1, rng.randint(1, 300)]) for _ in range(ns)]
        seq_lens = [n + rng.choice([0, rng.randint(0, 5000)]) for n in q_lens]
        bq, sink, window = rng.choice([1, 16, 64]), rng.choice([0, 16, 256]), rng.choice([1, 64, 1024])
        split = [rng.random() < 0.5 for _ in range(ns)]
        qsl = torch.tensor([0, *q_lens]).cumsum(0)
        qb = build_query_blocks(qsl, torch.tensor(seq_lens), block_size_q=bq, sink_tokens=sink,
                                window_tokens=window, split_last=torch.tensor(split, dtype=torch.bool))  # fmt: skip
        got = list(zip(*(getattr(qb, f).tolist() for f in ("seq", "q_start", "q_len", "pos", "window_start"))))
        want = _loop_blocks(q_lens, seq_lens, bq, sink, window, split)
        assert got == want, (q_lens, seq_lens, bq, split)
        assert qb.max_q_len == max((r[2] for r in want), default=0)
        assert qb.max_window_start == max((r[4] for r in want), default=0)
        assert qb.max_seq_len == max(seq_lens, default=0)
