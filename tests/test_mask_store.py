"""The layers' decode mask caches live in one stacked store per row tracker (vllm_hip.masks)."""

from __future__ import annotations

import torch

from vllm_hip.masks import LayerMaskCache, MaskStore

WIDTHS, SEL_W = [0, 6, 4], 3
DEV = torch.device("cpu")


def _fill(cache: LayerMaskCache, row: int, value: int) -> None:
    rows = torch.tensor([row])
    inputs = [None] + [(torch.full((1, w), value, dtype=torch.int32), torch.tensor([value], dtype=torch.int32))
                       for w in WIDTHS[1:]]
    cache.store(rows, 1, inputs, torch.full((1, SEL_W), value, dtype=torch.int32),
                torch.tensor([value], dtype=torch.int32))


def test_layers_are_slices_of_one_stack_and_move_together_once_per_step(monkeypatch):
    store = MaskStore()
    owners = [object() for _ in range(3)]
    for layer, o in enumerate(owners):
        # As in a step: a layer takes its view, then writes (a view is valid until the next call).
        view = store.layer_cache(o, WIDTHS, SEL_W, 4, DEV, None, 1)
        _fill(view, 0, 10 + layer)  # row 0 of each layer holds its own value
        _fill(view, 2, 20 + layer)
    moves = []
    real = LayerMaskCache.permute

    def counting(self, src_row, step_id):
        if self.step_id != step_id:
            moves.append(step_id)
        real(self, src_row, step_id)

    monkeypatch.setattr(LayerMaskCache, "permute", counting)
    src_row = torch.tensor([2, -1, 0])  # new row 0 was row 2, row 1 is new, row 2 was row 0
    views = [store.layer_cache(o, WIDTHS, SEL_W, 4, DEV, src_row, 2) for o in owners]
    assert moves == [2]  # one permutation for all three layers
    for layer, view in enumerate(views):
        assert view.sel[0].tolist() == [20 + layer] * SEL_W and int(view.sel_count[0]) == 20 + layer
        assert view.stage_inputs[2][0][2].tolist() == [10 + layer] * 4
        assert view.sel[1].tolist() == [-1] * SEL_W and not bool(view.valid[1])  # unknown row: empty
        assert bool(view.valid[0]) and bool(view.valid[2])


def test_store_grows_in_layers_and_rows_without_losing_state():
    store = MaskStore()
    a, b = object(), object()
    va = store.layer_cache(a, WIDTHS, SEL_W, 2, DEV, None, 1)
    _fill(va, 1, 7)
    vb = store.layer_cache(b, WIDTHS, SEL_W, 9, DEV, None, 1)  # a second layer and more rows
    assert vb.num_rows >= 9 and vb.sel[1].tolist() == [-1] * SEL_W
    va = store.layer_cache(a, WIDTHS, SEL_W, 9, DEV, None, 1)
    assert va.sel[1].tolist() == [7] * SEL_W and va.stage_inputs[1][0][1].tolist() == [7] * 6
    # Another shape (early layers' budget) is another stack: no cross-talk.
    other = store.layer_cache(object(), [0, 5, 2], 2, 9, DEV, None, 1)
    assert other.sel.shape[1] == 2 and other.sel[1].tolist() == [-1, -1]
