"""grain pipelines: packing invariants, determinism, exact resume, the global batch on the mesh, counting."""

import json

import grain
import numpy as np
import pytest

from jaxpost.data import encode, packing, pipeline, tokenizer as tk
from jaxpost.errors import UserError

SYNC = grain.ReadOptions(num_threads=0, prefetch_buffer_size=0)   # no prefetch: counts are exact


@pytest.fixture(scope="module")
def tok():
    return tk.build_tokenizer(["the sky is blue and the grass is green"] * 4, vocab_size=300)


def _sft_rows(n):
    # Varied lengths so packing puts several examples in a row.
    return [{"prompt": f"q{i}", "completion": " blue" * (1 + i % 5)} for i in range(n)]


def _check_lm_batch(b, B, L):
    assert {k: (v.shape, v.dtype.name) for k, v in b.items()} == {
        "tokens": ((B, L), "int32"), "positions": ((B, L), "int32"), "segment_ids": ((B, L), "int32"),
        "targets": ((B, L), "int32"), "loss_mask": ((B, L), "float32")}


def test_packing_segments_positions_and_targets(tok):
    examples = [encode.lm_arrays(np.arange(10, 10 + n, dtype=np.int32), np.ones(n, bool), pad=0)
                for n in (5, 3, 7, 2, 6, 4, 1, 8)]
    ds = grain.MapDataset.source(examples).to_iter_dataset(SYNC)
    rows = list(packing.pack_lm(ds, 10, num_bins=2, pad=0, shuffle_bins=False))
    seen = []
    for r in rows:
        seg, pos = r["segment_ids"], r["positions"]
        real = seg > 0
        assert not real[np.argmin(real):].any() if not real.all() else True   # padding only at the end
        k = seg.max()
        assert sorted(set(seg[real].tolist())) == list(range(1, k + 1))
        for s in range(1, k + 1):
            idx = np.flatnonzero(seg == s)
            assert (np.diff(idx) == 1).all() and pos[idx].tolist() == list(range(len(idx)))
            toks = r["tokens"][idx]
            seen.append(len(idx))
            np.testing.assert_array_equal(toks, np.arange(10, 10 + len(idx)))
            # Targets are the next token of the same segment; the last has none.
            np.testing.assert_array_equal(r["targets"][idx[:-1]], toks[1:])
            assert r["loss_mask"][idx[-1]] == 0 and (r["loss_mask"][idx[:-1]] == 1).all()
        assert (r["loss_mask"][~real] == 0).all() and (r["tokens"][~real] == 0).all()
    assert sorted(seen) == [1, 2, 3, 4, 5, 6, 7, 8]             # every example exactly once
    # First fit over 2 bins of 10: 5,3 -> bin 1; 7 -> bin 2; 2 -> bin 1 (full);
    # 6 fits neither -> both bins are emitted, and 6 starts the next pair.
    lengths = lambda r: np.bincount(r["segment_ids"])[1:].tolist()
    assert [lengths(r) for r in rows[:2]] == [[5, 3, 2], [7]]


def test_lm_pipeline_shapes_packed_and_unpacked(tok):
    rows = _sft_rows(12)
    packed = next(pipeline.make_lm_pipeline(rows, tok, 64, 3, seed=0))
    _check_lm_batch(packed, 3, 64)
    assert packed["segment_ids"].max() > 1                        # several examples per row
    plain = next(pipeline.make_lm_pipeline(rows, tok, 64, 3, seed=0, packing=False))
    _check_lm_batch(plain, 3, 64)
    assert plain["segment_ids"].max() == 1
    for b in (packed, plain):
        for row in range(3):
            real = b["segment_ids"][row] > 0
            trained = b["loss_mask"][row] > 0
            assert trained[~real].sum() == 0
            # Trained targets are completions: " blue"s and eos only.
            text = tok.decode(b["targets"][row][trained])
            assert set(text.replace(" blue", "").replace("<|eos|>", "")) == set()


def test_same_seed_same_batches_other_seed_differs(tok):
    rows = _sft_rows(30)
    make = lambda seed: pipeline.make_lm_pipeline(rows, tok, 48, 2, seed=seed)
    a, b, c = make(1), make(1), make(2)
    batches_a = [next(a) for _ in range(5)]
    batches_b = [next(b) for _ in range(5)]
    batches_c = [next(c) for _ in range(5)]
    for x, y in zip(batches_a, batches_b):
        for k in x:
            np.testing.assert_array_equal(x[k], y[k])
    assert any(not np.array_equal(x["tokens"], z["tokens"]) for x, z in zip(batches_a, batches_c))


@pytest.mark.parametrize("packing_on", [True, False])
def test_resume_from_state_gives_identical_batches_and_counts(tok, packing_on):
    rows = _sft_rows(25) + [{"prompt": "q", "completion": ""}] * 3 + [{"prompt": "q", "completion": " blue" * 40}]

    def make():
        return pipeline.make_lm_pipeline(rows, tok, 32, 2, seed=7, packing=packing_on, read_options=SYNC)

    it = make()
    for _ in range(4):
        next(it)
    state = json.loads(json.dumps(it.get_state()))       # must survive JSON
    expected = [next(it) for _ in range(20)]             # crosses an epoch boundary
    resumed = make()
    resumed.set_state(state)
    got = [next(resumed) for _ in range(20)]
    for x, y in zip(expected, got):
        for k in x:
            np.testing.assert_array_equal(x[k], y[k])
    # Elements replayed by grain after set_state are not counted twice.
    assert resumed.stats.as_metrics() == it.stats.as_metrics()
    assert it.stats.counts()["dropped_empty"] >= 3


def test_orbax_style_checkpoint_through_grain_handler(tok, tmp_path):
    # grain's own checkpoint handler accepts the iterator (it is a DatasetIterator).
    from etils import epath
    handler = grain.checkpoint.CheckpointHandler()
    it = pipeline.make_lm_pipeline(_sft_rows(10), tok, 32, 2, seed=0)
    next(it)
    handler.save(epath.Path(tmp_path), item=it)
    want = next(it)
    again = pipeline.make_lm_pipeline(_sft_rows(10), tok, 32, 2, seed=0)
    handler.restore(epath.Path(tmp_path), item=again)
    got = next(again)
    for k in want:
        np.testing.assert_array_equal(got[k], want[k])


def test_every_host_reads_all_rows_into_the_global_batch(tok, monkeypatch):
    # No shard arguments: the order is a function of the rows, seed and options alone.
    pref = [{"prompt": f"is the sky blue {i}?", "chosen": " yes", "rejected": " no"} for i in range(6)]
    for make, rows in ((pipeline.make_lm_pipeline, _sft_rows(6)), (pipeline.make_preference_pipeline, pref),
                       (pipeline.make_prompt_pipeline, pref)):
        with pytest.raises(TypeError, match="shard_index"):
            make(rows, tok, 16, 2, shard_index=0, shard_count=1)
    rows = [{"prompt": f"question {i}", "id": i} for i in range(23)]
    batches = list(pipeline.make_prompt_pipeline(rows, tok, 16, 4, seed=5, num_epochs=1))
    assert [b["prompt_tokens"].shape[0] for b in batches] == [4] * 6   # batch_size rows: the global batch
    ids = [r["id"] for b in batches for r in b["row"] if r is not None]
    assert sorted(ids) == list(range(23)) and ids != list(range(23))  # every row once, shuffled

    def packed_sft():
        it = pipeline.make_lm_pipeline(_sft_rows(40), tok, 32, 4, seed=3, read_options=SYNC)
        return [next(it) for _ in range(6)], it.get_state()

    want, want_state = packed_sft()
    # Process 1 of 2 builds the same batches (and the same iterator state) as a single process.
    monkeypatch.setattr("jax.process_count", lambda: 2)
    monkeypatch.setattr("jax.process_index", lambda: 1)
    got, got_state = packed_sft()
    assert got_state == want_state
    for a, b in zip(want, got):
        _check_lm_batch(b, 4, 32)
        for k in a:
            np.testing.assert_array_equal(a[k], b[k])


@pytest.mark.parametrize("rules,mesh_kw", [("data_parallel", dict(data=8, fsdp=1)), ("fsdp", dict(fsdp=8)),
                                           ("fsdp", dict(data=2, fsdp=4)), ("fsdp_tp", dict(data=2, fsdp=2, tensor=2)),
                                           ("fsdp", dict(fsdp=8, reverse=True))])
def test_on_mesh_puts_the_global_batch_on_the_mesh(tok, rules, mesh_kw):
    import jax
    from jaxpost.sharding import Partitioner, make_mesh
    from jaxpost.train.batches import MeshBatches, on_mesh

    devices = jax.devices()[::-1] if mesh_kw.pop("reverse", False) else None  # rows on devices in any order
    part = Partitioner(make_mesh(**mesh_kw, devices=devices), rules)
    it = pipeline.make_lm_pipeline(_sft_rows(30), tok, 32, 8, seed=1, read_options=SYNC)
    batch = next(it)
    batch["raw"] = ["not an array"] * 8
    out = on_mesh(batch, part)
    assert set(out) == set(batch) - {"raw"}
    for k, v in out.items():
        assert v.shape == batch[k].shape and v.dtype == batch[k].dtype and v.sharding == part.batch_sharding(2)
        np.testing.assert_array_equal(np.asarray(v), batch[k])
        for shard in v.addressable_shards:  # each device holds its own rows of the global batch
            np.testing.assert_array_equal(np.asarray(shard.data), batch[k][shard.index])
    again = pipeline.make_lm_pipeline(_sft_rows(30), tok, 32, 8, seed=1, read_options=SYNC)
    mesh_batches = MeshBatches(again, part)
    np.testing.assert_array_equal(np.asarray(next(mesh_batches)["tokens"]), batch["tokens"])
    assert mesh_batches.get_state() == it.get_state()


def test_empty_and_overlong_examples_are_counted_not_silently_dropped(tok):
    good = [{"prompt": "q", "completion": " blue"}] * 5
    empty = [{"prompt": "q", "completion": ""}] * 2
    long = [{"prompt": "q", "completion": " blue" * 60}] * 3
    rows = good + empty + long
    it = pipeline.make_lm_pipeline(rows, tok, 24, 1, packing=False, num_epochs=1)
    n_rows = len(list(it))
    assert it.stats.as_metrics() == {"data/examples": 10, "data/dropped_empty": 2, "data/truncated": 3,
                                     "data/dropped_too_long": 0, "data/dropped_truncated_empty": 0,
                                     "data/prompt_truncated": 0}
    assert n_rows == 8
    it = pipeline.make_lm_pipeline(rows, tok, 24, 1, packing=False, num_epochs=1, overlong="drop")
    assert len(list(it)) == 5
    assert it.stats.counts()["dropped_too_long"] == 3 and it.stats.counts()["dropped_empty"] == 2


def test_final_partial_batch_is_padded_to_fixed_shape(tok):
    it = pipeline.make_lm_pipeline(_sft_rows(5), tok, 32, 4, packing=False, num_epochs=1)
    batches = list(it)
    assert [b["tokens"].shape for b in batches] == [(4, 32), (4, 32)]
    last = batches[-1]
    assert (last["segment_ids"][1:] == 0).all() and (last["loss_mask"][1:] == 0).all()


def test_preference_pipeline_shapes_and_shared_prompt(tok):
    rows = [{"prompt": f"is the sky blue {i}?", "chosen": " yes blue", "rejected": " no", "margin": 0.5}
            for i in range(6)]
    b = next(pipeline.make_preference_pipeline(rows, tok, 24, 3, seed=0))
    for side in ("chosen", "rejected"):
        for k, dt in (("tokens", "int32"), ("positions", "int32"), ("segment_ids", "int32"),
                      ("targets", "int32"), ("loss_mask", "float32")):
            assert b[f"{side}_{k}"].shape == (3, 24) and b[f"{side}_{k}"].dtype.name == dt
    assert b["margin"].tolist() == [0.5] * 3
    for r in range(3):
        c, rj = b["chosen_tokens"][r], b["rejected_tokens"][r]
        first_diff = int(np.argmax(c != rj))
        prompt_len = int(np.argmax(b["chosen_loss_mask"][r] > 0)) + 1
        assert first_diff >= prompt_len                    # same prompt ids on both sides
        assert (b["rejected_loss_mask"][r][:prompt_len - 1] == 0).all()
        assert tok.decode(b["chosen_targets"][r][b["chosen_loss_mask"][r] > 0]) == " yes blue<|eos|>"
        assert tok.decode(b["rejected_targets"][r][b["rejected_loss_mask"][r] > 0]) == " no<|eos|>"
    implicit = [{"chosen": "Sky is blue", "rejected": "Sky is green"}] * 2
    b = next(pipeline.make_preference_pipeline(implicit, tok, 16, 2))
    assert tok.decode(b["chosen_targets"][0][b["chosen_loss_mask"][0] > 0]) == " blue<|eos|>"
    with pytest.raises(ValueError, match="Preference pipeline takes formats"):
        pipeline.make_preference_pipeline(_sft_rows(2), tok, 16, 2)


def test_prompt_pipeline_left_pads_and_keeps_raw_fields(tok):
    rows = [{"prompt": [{"role": "user", "content": "sky?"}], "answer": "blue"}] * 3
    b = next(pipeline.make_prompt_pipeline(rows, tok, 24, 2))
    assert b["prompt_tokens"].shape == (2, 24) and b["prompt_mask"].shape == (2, 24)
    n = int(b["prompt_mask"][0].sum())
    assert b["prompt_mask"][0].tolist() == [0] * (24 - n) + [1] * n
    assert tok.decode(b["prompt_tokens"][0][-n:]) == "<|bos|><|im_start|>user\nsky?<|im_end|>\n<|im_start|>assistant\n"
    assert b["row"][0]["answer"] == "blue" and b["prompt"][0] == rows[0]["prompt"]
    assert set(pipeline.array_entries(b)) == {"prompt_tokens", "prompt_mask"}


def test_bad_row_in_pipeline_names_row(tok):
    rows = [{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}] * 3
    rows = rows + [{"messages": [{"role": "user"}]}]
    # Rows are validated when the pipeline is built, before any batch (or model) exists; 1-based.
    with pytest.raises(UserError, match=r"row 4: messages\[0\] is missing required field 'content'"):
        pipeline.make_lm_pipeline(rows, tok, 32, 4, shuffle=False, num_epochs=1, read_options=SYNC)


def test_bad_row_from_file_names_file_and_row(tok, tmp_path):
    from jaxpost.data import load_rows
    good = {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}
    path = tmp_path / "chat.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in [good, {"messages": [{"role": "user"}]}, good]) + "\n")
    with pytest.raises(UserError, match=rf"row 2 of {path} \(line 2\): messages\[0\] is missing required field "
                                        "'content'"):
        load_rows(path)  # the Arrow-level check finds the row; its message is the row's own


def test_a_pass_that_drops_every_example_is_an_error_not_a_hang():
    from jaxpost.data import build_tokenizer

    tok = build_tokenizer(None, vocab_size=261)
    rows = [{"text": "x" * 100} for _ in range(5)]
    it = pipeline.make_lm_pipeline(rows, tok, seq_len=16, batch_size=2, overlong="drop")  # repeats forever
    with pytest.raises(ValueError, match=r"Every example .* was dropped.*'dropped_too_long': 5"):
        next(it)
