"""SFT end to end through `jaxpost train`'s code path, and its numerical contracts."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import transformers

from jaxpost import models
from jaxpost.algorithms import make_sft_loss
from jaxpost.data import load_rows, load_tokenizer, make_lm_pipeline
from jaxpost.models.config import ModelConfig
from jaxpost.models.heads import logits as full_logits
from pipeline_utils import losses, make_task, read_metrics, run_task


@pytest.fixture(scope="module")
def task(tmp_path_factory):
    return make_task(tmp_path_factory.mktemp("task"), n_sft=400, n_pref=200, n_prompts=50, n_eval=32)


def _sft_bindings(task, run_dir, steps, extra=()):
    return [f"sft.run_dir = '{run_dir}'", f"sft.train_data = '{task['sft']}'", f"sft.tokenizer = '{task['tokenizer']}'",
            "sft.seq_len = 64", "sft.batch_size = 8", f"LoopConfig.num_steps = {steps}", "LoopConfig.log_every = 1",
            "make_optimizer.learning_rate = 3e-3", *extra]


@pytest.mark.slow
def test_sft_run_lowers_loss_evaluates_and_exports(task, tmp_path):
    run_dir = tmp_path / "sft"
    summary = run_task("sft", _sft_bindings(task, run_dir, 40, ["sft.eval_fraction = 0.1", "LoopConfig.eval_every = 20",
                                                                "make_optimizer.warmup_steps = 4"]))
    curve = losses(run_dir)
    first, last = np.mean([curve[s] for s in (1, 2, 3)]), np.mean([curve[s] for s in (38, 39, 40)])
    assert last < 0.6 * first, (first, last)
    assert 0.1 < summary["eval/token_accuracy"] <= 1.0
    assert summary["data/examples"] > 0 and summary["data/dropped_empty"] == 0
    evals = [m for m in read_metrics(run_dir) if "eval/loss" in m]
    assert [m["step"] for m in evals] == [20, 40] and evals[1]["eval/loss"] < evals[0]["eval/loss"]
    assert (run_dir / "operative_config.gin").read_text().count("make_optimizer.learning_rate") == 1
    # The export is an ordinary Hugging Face directory.
    hf = transformers.AutoModelForCausalLM.from_pretrained(run_dir / "final")
    assert hf.config.num_hidden_layers == 2
    assert load_tokenizer(run_dir / "final").pad_token_id == 0
    # Its model card names the run: method, start, data, steps, final metrics, how to load it.
    card = (run_dir / "final" / "README.md").read_text()
    assert "| method | sft |" in card and "| base model | random init |" in card
    assert f"| train data | `{task['sft']}` |" in card and "| optimizer steps | 40 |" in card
    assert f"| `eval/token_accuracy` | {summary['eval/token_accuracy']:.6g} |" in card
    assert "sft.train_data" in card and "AutoModelForCausalLM.from_pretrained(path)" in card


@pytest.mark.slow
def test_sft_resume_continues_exactly(task, tmp_path):
    const = ["make_optimizer.schedule = 'constant'"]
    straight = tmp_path / "straight"
    run_task("sft", _sft_bindings(task, straight, 6, const))
    resumed = tmp_path / "resumed"
    run_task("sft", _sft_bindings(task, resumed, 3, const))     # "killed" after step 3 (its last checkpoint)
    run_task("sft", _sft_bindings(task, resumed, 6, const))     # same command, longer: resumes at step 3
    a, b = losses(straight), losses(resumed)
    assert sorted(b) == [1, 2, 3, 4, 5, 6]
    for step in range(1, 7):
        assert a[step] == b[step], (step, a[step], b[step])
    # Two steps per compiled call (the pipeline's global batches stacked on the devices): the same run.
    scanned = tmp_path / "scanned"
    run_task("sft", _sft_bindings(task, scanned, 6, const + ["LoopConfig.steps_per_call = 2",
                                                             "LoopConfig.log_every = 2"]))
    c = losses(scanned)
    assert sorted(c) == [2, 4, 6]
    for step in (2, 4, 6):
        assert c[step] == pytest.approx(a[step], rel=1e-5), (step, a[step], c[step])


def test_sft_resumes_in_the_other_layer_layout(task, tmp_path):
    """A checkpoint of the unrolled layers resumes with ``ModelConfig.scan_layers = True``: the same run."""
    const = ["make_optimizer.schedule = 'constant'", "LoopConfig.save_every = 2"]
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    run_task("sft", _sft_bindings(task, straight, 4, const))
    run_task("sft", _sft_bindings(task, resumed, 2, const))
    run_task("sft", _sft_bindings(task, resumed, 4, const + ["ModelConfig.scan_layers = True"]))
    a, b = losses(straight), losses(resumed)
    assert sorted(b) == [1, 2, 3, 4]
    for step in (3, 4):
        assert b[step] == pytest.approx(a[step], rel=1e-6, abs=1e-7), (step, a[step], b[step])
    # The scanned run exports the usual Hugging Face layout, with the same weights.
    _, _, want = models.load_hf(straight / "final")
    _, _, got = models.load_hf(resumed / "final")
    jax.tree.map(lambda x, y: np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=1e-6), want, got)
    assert "ModelConfig.scan_layers = True" in (resumed / "operative_config.gin").read_text()


def test_sft_loss_is_only_on_response_tokens(task):
    """The loss equals -mean log p over the assistant reply tokens, found by hand."""
    tok = load_tokenizer(task["tokenizer"])
    config = ModelConfig(vocab_size=264, hidden_size=32, intermediate_size=64, num_layers=1, num_heads=2,
                         num_kv_heads=1)
    graphdef, params = models.create(config, seed=1)
    rows = [{"messages": [{"role": "user", "content": "reverse: abc"}, {"role": "assistant", "content": "cba"}]}]
    batch = next(make_lm_pipeline(rows, tok, seq_len=64, batch_size=1, packing=False, shuffle=False))
    loss, _ = make_sft_loss(graphdef, config)(params, {k: jnp.asarray(v) for k, v in batch.items()})

    # Independently: render the chat, find the reply "cba<|im_end|>" by its text, score it with full logits.
    text = tok.apply_chat_template(rows[0]["messages"], tokenize=False)
    ids = tok(text, add_special_tokens=False)["input_ids"]
    prefix = tok(text[:text.index("cba<|im_end|>")], add_special_tokens=False)["input_ids"]
    reply = list(range(len(prefix), len(prefix) + len(tok("cba", add_special_tokens=False)["input_ids"]) + 1))
    x = jnp.asarray([ids])
    hidden, _ = models.forward(graphdef, params, x, jnp.arange(len(ids))[None], jnp.ones_like(x))
    logp = jax.nn.log_softmax(full_logits(params, config, hidden)[0], axis=-1)
    expected = -np.mean([float(logp[t - 1, ids[t]]) for t in reply])
    assert float(loss) == pytest.approx(expected, abs=1e-5)
    assert int(batch["loss_mask"].sum()) == len(reply) == 4


def test_packing_gives_the_same_loss_as_unpacked(task):
    tok = load_tokenizer(task["tokenizer"])
    config = ModelConfig(vocab_size=264, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=2,
                         num_kv_heads=1)
    graphdef, params = models.create(config, seed=2)
    loss_fn = jax.jit(make_sft_loss(graphdef, config))
    rows = load_rows(task["sft"]).select(range(24))

    def totals(packing):
        nll = n = 0.0
        for batch in make_lm_pipeline(rows, tok, seq_len=64, batch_size=4, packing=packing, num_epochs=1,
                                      shuffle=False):
            _, m = loss_fn(params, {k: jnp.asarray(v) for k, v in batch.items()})
            nll, n = nll + float(m["loss_sum"]), n + float(m["loss_tokens"])
        return nll, n

    (nll_p, n_p), (nll_u, n_u) = totals(True), totals(False)
    assert n_p == n_u > 0
    assert nll_p / n_p == pytest.approx(nll_u / n_u, rel=1e-5)


def test_fsdp_sft_steps_match_one_device(task):
    """Three SFT steps of the transformer on 8 devices (FSDP) equal the same steps on 1 device."""
    from jaxpost.sharding import Partitioner, make_mesh
    from jaxpost.train import (abstract_state, batch_shardings, compile_train_step, init_sharded_state,
                               make_optimizer, make_train_step, state_shardings)

    tok = load_tokenizer(task["tokenizer"])
    config = ModelConfig(vocab_size=264, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4,
                         num_kv_heads=2)
    batches = [{k: np.asarray(v) for k, v in b.items()} for b, _ in
               zip(make_lm_pipeline(load_rows(task["sft"]), tok, seq_len=64, batch_size=8, seed=3), range(3))]

    def run(part):
        graphdef, params = models.create(config, seed=0, partitioner=part)
        opt = make_optimizer(learning_rate=1e-3, total_steps=3, schedule="constant")
        shardings = state_shardings(abstract_state(params, opt), part.shardings(models.logical_axes(config), params),
                                    part, opt)
        state = init_sharded_state(params, opt, shardings)
        step = compile_train_step(make_train_step(make_sft_loss(graphdef, config), opt), shardings,
                                  batch_shardings(batches[0], part))
        out = []
        with part.activate():
            for b in batches:
                state, m = step(state, {k: jax.device_put(v, part.batch_sharding(v.ndim)) for k, v in b.items()}, None)
                out.append(float(m["loss"]))
        return out, state.params

    one, p1 = run(Partitioner(make_mesh(fsdp=1, devices=jax.devices()[:1]), "fsdp"))
    eight, p8 = run(Partitioner(make_mesh(fsdp=8), "fsdp"))
    assert p8["layers"][0]["mlp"]["up_proj"]["kernel"].sharding.spec[0] == "fsdp"
    np.testing.assert_allclose(one, eight, rtol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5), p1, p8)
